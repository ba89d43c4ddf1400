"""Facts about the running process that change performance: which host allocator is in use."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def host_allocator() -> str:
    """'tcmalloc' when a tcmalloc library is mapped into this process (launch/*.sh preload it), else 'glibc'.

    XLA on CPU allocates and frees multi-MB buffers every step; glibc returns them to the kernel and faults the
    pages in again on the next step, which cost ClusterFormer-T's CPU train step about a fifth of its time.
    Read once per process (the preload cannot change): every ClusterFormer block asks when it is traced.
    """
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if any("tcmalloc" in line for line in maps) else "glibc"
    except OSError:  # not Linux
        return "system"


TCMALLOC_HINT = (
    "apt-get install libtcmalloc-minimal4 and start through launch/*.sh, which preload it: "
    "about 1.2x faster CPU train steps"
)

"""Execution settings resolved once per process, outside the model.

A model is a pure function of its config. What depends on the machine (backend, device count, host
allocator) is read here, at start-up, by the trainer or a benchmark, and turned into explicit model fields;
model code never asks. Every setting gives the same numbers, only speed and memory differ:

- ``depthwise_impl``: 'shifted' (k*k shifted products with a hand-written backward; much faster on XLA
  CPU) or 'grouped' (``conv_general_dilated``, the native depthwise kernels of cuDNN and the TPU).
- ``remat_impl``: 'tied' (recomputation tied to the incoming gradient; XLA CPU drops ``jax.checkpoint``'s
  barrier and would merge the recomputation back into the forward) or 'barrier' (``nn.remat``).
- ``em_unroll``: EM steps per scan-loop iteration; 1 (a rolled loop) on CPU without tcmalloc, where the
  unrolled step's larger temporaries are page-faulted in anew every step; None (all T) elsewhere.
- ``group_chunk_bytes``: on one CPU device, cluster the (image, head, window) groups in chunks whose (K, N)
  assignments fit this many bytes (a core's L2); None elsewhere, where the group axis is the sharded batch.
- ``norm_impl``: GroupNorm(1) as flax's ``nn.GroupNorm`` ('grouped', ~10% faster CF-T train steps on XLA
  CPU) or without its size-1 group axis ('ungrouped', which a TPU would tile 8x in what the backward keeps).
- ``dispatch_impl``: the released hard dispatch through gathers and scatters ('scatter'), or as one-hot
  matmuls ('onehot') on the TPU, whose scatters cost bytes growing faster than the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any

EXECUTION_FIELDS = ("depthwise_impl", "remat_impl", "em_unroll", "group_chunk_bytes", "norm_impl", "dispatch_impl")
GROUP_CHUNK_BYTES = 1 << 20
TCMALLOC_HINT = (
    "apt-get install libtcmalloc-minimal4 and start through launch/*.sh, which preload it: "
    "about 1.2x faster CPU train steps"
)


@functools.lru_cache(maxsize=None)
def host_allocator() -> str:
    """'tcmalloc' when a tcmalloc library is mapped into this process (launch/*.sh preload it), else 'glibc'."""
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if any("tcmalloc" in line for line in maps) else "glibc"
    except OSError:  # not Linux
        return "system"


def execution_settings(
    backend: str | None = None, num_devices: int | None = None, allocator: str | None = None
) -> dict[str, Any]:
    """The execution fields for this process (or for the given backend, device count and allocator)."""
    import jax  # only when the caller does not say

    backend = backend or jax.default_backend()
    num_devices = jax.device_count() if num_devices is None else num_devices
    allocator = allocator or host_allocator()
    cpu = backend == "cpu"
    return {
        "depthwise_impl": "shifted" if cpu else "grouped",
        "remat_impl": "tied" if cpu else "barrier",
        "em_unroll": 1 if cpu and allocator != "tcmalloc" else None,
        "group_chunk_bytes": GROUP_CHUNK_BYTES if cpu and num_devices == 1 else None,
        "norm_impl": "grouped" if cpu else "ungrouped",
        "dispatch_impl": "onehot" if backend == "tpu" else "scatter",
    }


def with_execution_settings(model_fields: Collection[str], overrides: dict[str, Any], **machine: Any) -> dict[str, Any]:
    """``overrides`` plus this machine's execution settings for the fields the model has and the user left unset."""
    defaults = execution_settings(**machine)
    resolved = {k: v for k, v in defaults.items() if k in model_fields and overrides.get(k) is None}
    return {**overrides, **resolved}


def one_shot_compiler_options(backend: str) -> dict[str, Any] | None:
    """XLA options for programs that run once (parameter init): on CPU without the LLVM backend's optimisation
    passes, which halves the compile time of a model's init (nano: 66 s -> 32 s on a busy 2-core machine). The
    random bits are the same; float steps of the initialisers may round differently in the last bit (max
    6e-8 on nano), so it is the same draw up to rounding, deterministic from run to run."""
    if backend != "cpu":
        return None
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

"""Checks that model_throughput.py's memory accounting works on this machine and allocator: freed heap pages
go back to the kernel (``release_free_memory``), and each row's peak RSS is its own (``measure_row`` resets
the high-water mark). Prints the measured MiB; exits 1 if either check fails.

  bash launch/python.sh benchmarks/memory_accounting.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_throughput as throughput  # noqa: E402


def main() -> int:
    blocks = [bytearray(b"\1" * 60000) for _ in range(4000)]  # 229 MiB in blocks below glibc's mmap threshold
    del blocks[::2]  # 114 MiB freed between live blocks: nothing at the heap's top for free() to trim
    before = throughput._proc_status_mib("VmRSS")
    throughput.release_free_memory()  # glibc's malloc_trim, or tcmalloc's when preloaded
    returned = before - throughput._proc_status_mib("VmRSS")
    big = throughput.measure_row(lambda: {"sum": np.ones(300 * 2**20 // 8).sum()})  # touches 300 MiB
    small = throughput.measure_row(lambda: {})
    own_peak = big["rss_mib"] - small["rss_mib"]
    checks = [
        (f"freed pages returned to the kernel: {returned:.0f} MiB of 114", returned > 80),
        (f"a row's peak RSS is its own: 300 MiB row minus empty row = {own_peak:.0f} MiB", own_peak > 250),
    ]
    for text, ok in checks:
        print(("ok   " if ok else "FAIL ") + text)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

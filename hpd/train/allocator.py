"""glibc malloc settings for the `hpd` command on Linux: fewer page faults per step.

With glibc's defaults, a block above its mmap threshold (dynamic, at most 32 MiB) is
mapped fresh on every allocation and unmapped when freed, and freed heap above 128 KiB
at the top is given back: each step's large buffers (logit chunks, gradients,
activations) are then paid for in minor page faults, which on CPU cost more system time
than the arithmetic costs user time. Fixing the threshold at its 32 MiB ceiling and
keeping up to 1 GiB of freed heap lets those buffers be reused instead. Measured on a
3-step 64k-vocabulary hpd run (benchmarks/memory_peak.py): see the notes beside
`tune()`. The chunked loss's default budget keeps each chunk buffer under the 32 MiB
threshold, so chunks come from the reused heap too.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more than half its 64 MiB heap size
TRIM_THRESHOLD = 2**30  # mallopt takes a C int


def tune() -> bool:
    """Set the thresholds (Linux with glibc only; a MALLOC_* variable the user set wins).
    Returns whether they were set."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: leave them alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["tune"]

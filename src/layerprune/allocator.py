"""Keep freed memory in the process for reuse (glibc's malloc), set once by the command line.

On CPU, PyTorch takes every tensor from the C library's malloc. glibc starts by serving blocks of
128 KiB and more with a fresh mmap, returned on free, and hands the top of its heap back to the
kernel as soon as a little of it is free: so the activations of every micro-batch (a few MiB to
a few dozen MiB a tensor) are new memory that the kernel faults in and zeroes page by page, again
and again. A healing step on SmolLM2 touched about 0.3-0.7 GB of such pages, a sixth of its CPU
time in the kernel. Here blocks up to 32 MiB (glibc's largest threshold) come from the heap and
the heap is kept, so the same memory is reused; larger blocks (whole-vocabulary logits) are still
mapped and returned, so memory freed by one phase does not sit in another's way. Measured with
`python bench/bench_allocator.py`.

A user who sets glibc's own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, ...) keeps
them; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
LARGEST_HEAP_BLOCK = 32 * 2**20   # the most M_MMAP_THRESHOLD takes on 64-bit glibc
KEEP = 2**31 - 1   # mallopt takes an int: free heap above this much is still returned
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and stop trimming it, in this process; whether it
    was done (not on a non-glibc system, nor where the user set glibc's variables)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt   # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))

"""The ``nir`` process keeps the memory a step frees for the next step (glibc's ``mallopt``).

A training step allocates and frees the same large tensors every time (the finest grid's
gradients, 4 x 97^3 floats; the lattice's reads). glibc serves a block above its mmap
threshold (128 KiB at first, raised to the largest block freed, at most 32 MiB) with a fresh
``mmap`` and returns the heap's free top above its trim threshold to the kernel, so such blocks
came back as new pages, zeroed by the kernel on first touch: 2,000-10,000 page faults a
finest-stage step on the 2 mm brains, and a step time that varied with how many.
:func:`keep_freed_memory` sets both thresholds once for the process (blocks up to 32 MiB from the
heap, free memory kept up to 1 GiB), so the pages are reused: 0-450 faults a step, and the
finest step's median 4 % and 14 % quicker at 2 threads in two sets of alternated runs
(``benchmarks/README.md``, 0.2.24). The peak memory is the same; what the process holds between
peaks is not given back until it ends. It changes no number: only where the bytes live.

Only for a process ``nir`` owns (its console script): a notebook's or a caller's process keeps
its allocator as it is. ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the
environment win (the user's own tuning), and other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's largest mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``)."""
TRIM_THRESHOLD = 1024 * 1024 * 1024
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; whether they were set.

    >>> isinstance(keep_freed_memory(), bool)
    True
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))

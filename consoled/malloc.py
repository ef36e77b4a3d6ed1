"""Keep glibc from mapping and unmapping pages around every socket read.

CPython allocates a read's whole size before the kernel fills it, then
shrinks the result to what arrived.  consoled reads up to 256 KiB at a time
(fewer, bigger frames while a console streams), and with glibc's defaults an
allocation that size is mapped fresh (``M_MMAP_THRESHOLD``, 128 KiB) or, once
shrunk, trimmed off the top of the heap again (``M_TRIM_THRESHOLD``): about
17 µs of system calls and page faults per read, a fifth of what a keystroke's
round trip through consoled costs (``benchmarks/run.py --only latency``).
Raising both thresholds keeps those buffers in the heap; what it costs is at
most ``TRIM`` bytes of freed heap kept by the process instead of returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from twisted.logger import Logger

log = Logger()

#: allocations below this come from the heap (glibc's default: 128 KiB, adaptive)
MMAP = 4 << 20
#: free heap above this is given back to the system (glibc's default: 128 KiB)
TRIM = 16 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds; False where that does not apply.

    An operator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
    is left alone.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM) == 1
    if not done:
        log.warn("could not raise glibc's malloc thresholds; socket reads cost more")
    return done

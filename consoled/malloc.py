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

`release` gives the freed heap back at once (``malloc_trim``), the top and the
free pages between live blocks alike.  `consoled.tls` calls it when a burst of
TLS handshakes is over: each handshake in flight holds ~30 KiB that OpenSSL
frees when it ends (a 21 KiB handshake message buffer, 8 KiB of write
buffering), and the blocks each session keeps are placed between them, so a
burst leaves holes that no threshold gives back (docs/tls.md, "Memory per
session").
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

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (loaded once); else None."""
    global _libc
    if _libc is None and platform.libc_ver()[0] == "glibc":
        name = ctypes.util.find_library("c")
        if name is not None:
            _libc = ctypes.CDLL(name)
    return _libc


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds; False where that does not apply.

    An operator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
    is left alone.
    """
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM) == 1
    if not done:
        log.warn("could not raise glibc's malloc thresholds; socket reads cost more")
    return done


def release() -> bool:
    """Return the heap's free pages to the system now; False where that does not apply.

    glibc's ``malloc_trim(0)``: the free top of the heap is given back and the
    whole free pages between live blocks are dropped (``MADV_DONTNEED``); the
    process faults them in again when it reuses them, so a socket read may
    pay the cost `tune` avoids once after a release, not on every read.  On a
    27 MB heap it took 0.15-0.3 ms after a burst of 50 TLS handshakes, 0.5 ms
    after 200, ~10 µs with nothing to give back.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True

"""Host memory reuse: keep the memory a step frees inside the process, so the next step does not fault it back in.

glibc's malloc serves every block above its mmap threshold (128 KiB at start, raised on the fly up to 32 MiB) with
fresh pages from the kernel and hands them back on `free`, and it trims the top of its heap as soon as more than
twice that lies free there. A training step on the CPU allocates its activations and gradients (MBs each) and frees
them all at its end, so every step pays one page fault per 4 KiB page it touches again: on resnet20 at batch 200 one
Tent step took ~35,000 minor faults and ~80 ms of kernel time against ~450 ms of user time (benchmarks/RESULTS.md
section 14). Raising both thresholds once per process keeps freed blocks in the heap for the next step: ~1,000
faults and ~4 ms per step. Nothing a step computes changes (the same kernels run on the same values); the process
keeps up to its high-water mark of memory mapped instead of returning it between steps.

`runtime.host_memory: reuse` (the default) applies it when a run starts (`engine.run`); `system` leaves the C
library's policy alone. On a platform without glibc's `mallopt` it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["HOST_MEMORY", "REUSE_LIMIT", "reuse_freed_memory"]

HOST_MEMORY = ("reuse", "system")
# Blocks up to this size come from (and go back to) the heap, and this much free heap top is kept.
REUSE_LIMIT = 1 << 30
# glibc's mallopt parameters (malloc.h); older glibc caps the mmap threshold at 32 MiB on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_CAP = 32 << 20

_applied: int | None = None  # the mmap threshold set in this process (None: not yet / not possible)


def reuse_freed_memory(limit: int = REUSE_LIMIT) -> int | None:
    """Raise glibc's mmap and trim thresholds to `limit` bytes (once per process); the threshold in force, or None
    where the C library is not glibc (nothing changed)."""
    global _applied
    if _applied is not None:
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    threshold = limit if mallopt(_M_MMAP_THRESHOLD, limit) == 1 else None
    if threshold is None and mallopt(_M_MMAP_THRESHOLD, min(limit, _GLIBC_CAP)) == 1:
        threshold = min(limit, _GLIBC_CAP)
    if threshold is None:
        return None
    mallopt(_M_TRIM_THRESHOLD, max(limit, threshold))
    _applied = threshold
    return threshold

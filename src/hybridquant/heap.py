"""How the process's C heap serves the calibration walkers' large, short-lived tensors.

The walkers allocate and free chunk-sized tensors (tens of MiB, of many sizes) thousands of times. glibc
serves those from its heap once its dynamic mmap threshold has risen to their size, and keeps what they
leave as free blocks: the resident memory then grows with the number of chunks, that is with the
calibration images, however small the workspace keeps its stored values. :func:`release` at phase and node
boundaries hands freed heap back; :func:`configure` gives large tensors mappings of their own, in transparent
huge pages so that mapping them costs few page faults. ``benchmarks/heap.py`` measures each set-up's peak
RSS at two calibration sizes and its time (``benchmarks/results/heap.md``).

:func:`prepare_environment` must run before ``torch`` is imported (torch reads ``THP_MEM_ALLOC_ENABLE`` once);
the command line does both, first thing (its module imports no torch). Everything here is a no-op where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: tensors from this size up get their own mapping (glibc's ``M_MMAP_THRESHOLD``; its maximum is 32 MiB)
MMAP_THRESHOLD = 8 * 2**20
_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def prepare_environment() -> None:
    """Ask torch to put tensors of 2 MiB and more in transparent huge pages (unless the environment says
    otherwise). Only effective before ``torch`` is imported."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def configure() -> bool:
    """Give every allocation of :data:`MMAP_THRESHOLD` bytes or more its own mapping, returned to the
    system when freed (this also stops glibc raising the threshold as it sees large frees). Process-wide;
    returns whether it took effect."""
    return bool(_LIBC is not None and _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release() -> None:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``): a phase's peak is then its
    own, not the heap the phases before it left. Called at phase boundaries and once per walked node, layer
    or block."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

"""Handing freed memory back to the system: the agent's peak (two listings of every lease, a full
sync's kernel read) leaves the C heap holding pages Python and gRPC have freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Callable, Optional

log = logging.getLogger(__name__)


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None (musl and other C libraries do not have it)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> bool:
    """Return the C heap's free pages to the kernel (glibc malloc_trim(0), every arena); False where
    the C library cannot. Costs a few milliseconds on a large heap: call it after big passes, not per event."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True

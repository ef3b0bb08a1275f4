"""Giving freed memory back to the operating system.

A library is built from many small per-adapter tensors (a rank-8 B of a 576-wide layer is 18 KiB), which the C
allocator serves from its heap; once the banks hold one stacked copy and the small tensors are freed, glibc keeps
those pages (the process still shows them as resident) until asked to trim. Measured on SmolLM2-135M with 100
rank-8 adapters: 1.85-2.0x the tensors' size resident after attach without a trim, 1.00x with one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc's malloc_trim); False where there is no such call."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False

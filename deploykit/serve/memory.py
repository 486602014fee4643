"""The process's heap: freed memory goes back to the operating system, so that the server's resident memory
after a burst of large images returns to where it was, without making every request fault in fresh pages
(glibc only; a no-op elsewhere).

glibc serves a large allocation with its own mapping and unmaps it when freed, but by default it raises that
threshold up to 32 MB whenever such a block is freed: Pillow's image blocks (16 MB) and NumPy's arrays then
come from the heap arenas of the request threads, which keep the freed pages. :func:`tune_heap` fixes the
threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the raising off) and, with it, how much free
memory a heap keeps at its top (``M_TRIM_THRESHOLD``): left at glibc's 128 kB, every request's decoded
image and tensor (a few hundred kB each) would be given back when freed and faulted in again, page by page,
by the next request. docs/serving.md has the memory and the CPU time each saves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("deploykit.serve")

#: Allocations of this size or more get a mapping of their own, returned to the system when freed.
MMAP_THRESHOLD = 1024 * 1024
#: Free memory a heap keeps at its top for the next allocations (one request's arrays, several times over).
TRIM_THRESHOLD = 4 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc


def tune_heap(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds (bytes); False where that is not possible (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (``malloc_trim``).

    Building an ONNX Runtime session parses the whole model and frees most of it again, but glibc keeps
    the freed pages: for resnet18 that is about 90 MB of resident memory that ``malloc_trim`` returns.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

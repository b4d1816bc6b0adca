"""Keep freed memory inside the process while training: ``retained_heap`` (Linux, glibc).

Every training step allocates and frees the same activation buffers (12.8 MB each for a batch of
128 at 32×28×28). glibc serves blocks that large with ``mmap`` and gives them back with ``munmap``
(and trims its heap top past 128 KiB), so each step the kernel maps and zero-fills tens of
megabytes of fresh pages. Inside :func:`retained_heap`, ``mallopt`` serves large blocks from the
heap and never trims it, so freed buffers are reused as they are.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from contextlib import contextmanager

__all__ = ["retained_heap"]

# glibc mallopt parameters (malloc.h) and the defaults they are restored to.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}
_RETAINED = {_M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20, _M_MMAP_THRESHOLD: 1 << 30}
_heap_lock = threading.Lock()
_heap_users = 0


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def retained_heap(enabled: bool = True):
    """Keep memory that tensors free inside the process while the block runs (Linux, glibc).

    Inside the block, ``mallopt`` serves large blocks from the heap and never trims it, so the
    buffers a training step frees are reused by the next step as they are instead of being
    unmapped and re-faulted; peak memory is unchanged (the same buffers are live at the peak),
    the process just keeps it. ``enabled=False`` does nothing.

    On exit the glibc defaults are restored (a fixed 128 KiB mmap/trim threshold: glibc's dynamic
    threshold adjustment stays off once set) and ``malloc_trim(0)`` returns the free memory.
    Nested and concurrent blocks (trainers in several threads) share one setting: the last to
    leave restores it. Elsewhere (macOS, Windows, musl) it does nothing.
    """
    global _heap_users
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_users += 1
        if _heap_users == 1:
            for param, value in _RETAINED.items():
                libc.mallopt(param, value)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                for param, value in _GLIBC_DEFAULTS.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)

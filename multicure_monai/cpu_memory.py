"""Keep the memory a process frees for its next allocations instead of handing it back to the OS (glibc malloc).

glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with fresh pages from
``mmap`` and unmaps them on ``free``. A 3D network's activations are tens of MiB each and new every iteration, so on
CPU each of them pays the kernel's page faults and zero-filling again: about a fifth of a forward + backward pass of
the V-Net at 4 x 56x56x40 (benchmarks/README.md). PyTorch's CPU allocator does not cache blocks (its CUDA one does),
and jemalloc / tcmalloc through ``LD_PRELOAD`` need an install and a wrapper; :func:`keep_freed_memory` sets the
two glibc options that have the same effect from inside the process (``mallopt``): no ``mmap`` for large blocks
(``M_MMAP_MAX = 0``) and no trimming of the heap (``M_TRIM_THRESHOLD = -1``). The numbers computed do not change;
the process keeps its peak memory until it exits. Elsewhere than Linux with glibc it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import sys

__all__ = ["keep_freed_memory"]

_logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.lru_cache(maxsize=None)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (``mallopt`` available), else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(enable: bool = True) -> bool:
    """Let glibc keep freed memory in the process for the next allocations (see the module docstring).

    Args:
        enable: ``False`` leaves the allocator as it is (the bundle's ``keep_freed_memory: false``).

    Returns:
        Whether the setting is now in effect (``False`` when disabled, or not glibc).
    """
    if not enable:
        return False
    libc = _glibc()
    if libc is None:
        _logger.info(f"keep_freed_memory: not Linux with glibc ({platform.system()}), the allocator is left as it is")
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _logger.info(f"keep_freed_memory: glibc keeps freed memory in the process (no mmap, no trim): {ok}")
    return ok

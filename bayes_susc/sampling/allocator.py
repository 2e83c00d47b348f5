"""Keep freed memory in the process: the CPU allocator setting sampling runs want.

A sampler step on CPU allocates and frees the same large activations (megabytes each)
every step. glibc's ``malloc`` hands blocks that large back to the kernel when they are
freed (``munmap``, or trimming the top of the heap), so the next step's block of the same
size is new memory again and every page of it faults on first touch. On the 2-core
reference machine that first-touch cost was 7–20 % of a head's sampling time
(``benchmarks/README.md``). :func:`keep_freed_memory` tells ``malloc`` to serve blocks up
to 32 MiB from the heap and not to trim it, the setting PyTorch's CPU performance guide
reaches with jemalloc or tcmalloc. The cost is that the process keeps its peak heap
until it exits.

It changes a process-wide setting, so the library never calls it on its own: the
``bayes-susc`` command line and the benchmarks do (on both sides of a comparison);
call it yourself before sampling in a script or notebook. Worker processes that a
:class:`~bayes_susc.sampling.executor.ProcessExecutor` starts take the setting of the process that
started them (:func:`applied_top_pad`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["applied_top_pad", "keep_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit systems
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int
_APPLIED: dict[str, int | None] = {"top_pad": None}


def applied_top_pad() -> int | None:
    """``top_pad_bytes`` of the last :func:`keep_freed_memory` call that took effect in
    this process, or None if none did."""
    return _APPLIED["top_pad"]


def keep_freed_memory(top_pad_bytes: int = 256 * 1024 * 1024) -> bool:
    """Make glibc ``malloc`` keep freed blocks (≤ 32 MiB from the heap, no trimming).

    Args:
        top_pad_bytes: extra bytes requested from the kernel each time the heap grows
            (fewer, larger growth steps); 0 <= top_pad_bytes < 2**31.

    Returns:
        True when the setting was applied (Linux with glibc), False where there is no
        glibc ``mallopt`` (macOS, Windows, musl): a no-op there.
    """
    if not (isinstance(top_pad_bytes, int) and 0 <= top_pad_bytes < 2**31):
        raise ValueError(f"top_pad_bytes must be an int in [0, 2**31), got {top_pad_bytes!r}")
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
        (_M_TRIM_THRESHOLD, _TRIM_NEVER),
        (_M_TOP_PAD, top_pad_bytes),
    )
    applied = all(mallopt(param, value) == 1 for param, value in settings)
    if applied:
        _APPLIED["top_pad"] = top_pad_bytes
    return applied

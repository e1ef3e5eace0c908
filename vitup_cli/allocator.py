"""Host memory allocator settings for the ``vitup`` process.

Dense decoding allocates the same few large tensors (``(N, 4C)`` MLP activations, 77 MB at 112^2
queries and C = 384) for every chunk. glibc's ``malloc`` serves anything above its mmap threshold
(at most 32 MB by default) with a fresh ``mmap`` and hands it back with ``munmap`` on free, so every
chunk page-faults all of that memory in again: measured on the 2-core CPU box, a fifth of ViT-Up's
decode time went to the kernel zeroing pages. Raising the mmap and trim thresholds keeps freed blocks in
the heap for the next chunk (the same effect PyTorch's CPU tuning guide gets from jemalloc or tcmalloc,
without preloading a library). Values are never changed; only where the bytes come from.

The ``vitup`` command applies it at start (``vitup_cli.cli.main``); importing vitup as a library
changes nothing. ``VITUP_MALLOC=default`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: blocks below this come from the heap and are reused; 1 GiB covers every per-chunk buffer
DEFAULT_MMAP_THRESHOLD = 1 << 30
#: free memory at the top of the heap is returned to the system only above this
DEFAULT_TRIM_THRESHOLD = 2 << 30


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl and macOS do not)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; ``True`` when both were set.

    A no-op (``False``) without glibc or with ``VITUP_MALLOC=default`` in the environment."""
    if os.environ.get("VITUP_MALLOC", "").lower() == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1))
    mmap = libc.mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1))
    return bool(trim and mmap)

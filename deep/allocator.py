"""Keep freed activation buffers in the process instead of handing them back to the OS.

glibc's malloc serves a large block (one 64x16x28x28 float activation is 3.2 MB) with a
fresh `mmap` and unmaps it when it is freed, so every training step faults its activations
in again, page by page, and the kernel zeroes each page first (docs/performance.md has
the system time `python -m deep.speed` measured with and without this setting). jemalloc or tcmalloc, which PyTorch's CPU performance notes recommend, avoid it
the same way; this needs no extra library.

The setting is process-wide and lasts until the process ends: freed memory stays
reserved by the process (up to the peak it reached), as PyTorch's CUDA caching allocator
does on GPUs. The command-line entry points call `keep_freed_memory()`; library users may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# glibc refuses an mmap threshold above 32 MiB on 64-bit (HEAP_MAX_SIZE / 2); larger
# blocks (ResNet-50's first stage at batch 64) keep their own mappings.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
TOP_PAD = 64 * 2**20

_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process.

    Returns True when they were set (Linux with glibc), False elsewhere (nothing changes:
    macOS and Windows allocators do not unmap on every free).
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    _applied = ok
    return ok

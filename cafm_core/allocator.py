"""Keep host memory freed by one training step for the next (glibc's malloc).

CAFM steps hold large, short-lived activations (a D step's double-backward graph; the
discriminator's and the generator's activations in a G step). With glibc's default
settings the memory freed at the end of a step goes back to the operating system (the
heap's top is trimmed; blocks above the adaptive mmap threshold are unmapped), and the
next step faults the same pages in again: 39,000-63,000 minor page faults (150-250 MiB) per
CAFM cycle of 4 D steps and a G step of the tiny DiT at batch 128 on CPU, against 0-1,400
with this setting (``tests/unit/core/test_allocator.py`` counts them; docs/benchmarks.md).

``retain_freed_memory`` fixes the mmap threshold at its largest value (32 MiB on 64-bit
glibc; tensors below it come from the heap) and raises the trim threshold, so a training
process keeps its working set between steps. The cost is memory: up to the trim threshold
of freed heap stays mapped to the process. Process-wide, so called by the programs that own
their process (the Ray Train worker loop, the benchmarks), not by library functions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["retain_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit builds)
MMAP_THRESHOLD_MAX = 32 * 2**20
DEFAULT_TRIM_THRESHOLD = 512 * 2**20


def retain_freed_memory(trim_threshold: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to ``trim_threshold``.

    Returns True when both settings were accepted; False (and changes nothing) where the C
    library is not glibc (musl, macOS, Windows).
    """
    if not MMAP_THRESHOLD_MAX <= trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be in [{MMAP_THRESHOLD_MAX}, 2**31) bytes (a C int), got {trim_threshold}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))

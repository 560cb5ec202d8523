"""Keeping freed memory for reuse during training on the CPU (Linux, glibc).

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap``
and unmaps it at ``free``: a training step that allocates and frees the same large tensors at
every step (the label encoder's full-resolution activations and their gradients, 34-67 MB each
at 32x64x64-64^3) has the kernel fault in and zero their pages again every step. That cost
10-13 % of a latent-denoiser step here (benchmarks/speed.md). :func:`keep_freed_memory` makes
malloc serve large blocks from its heap and keep freed memory for the next step (``mallopt``:
no mmap, no trimming). The price: the process keeps its peak memory until it exits instead of
returning freed blocks to the system, which a training process reaches again at every step anyway.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in this process; False where that is not
    possible (not Linux, not glibc) or was refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("malloc keeps freed memory: %s", done)
    return done

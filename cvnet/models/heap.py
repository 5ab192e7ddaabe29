"""Large tensors without page faults: glibc keeps freed blocks in its heap for the next tensor.

By default glibc serves each block above 32 MiB with a fresh ``mmap`` and unmaps it at
``free``, so every large tensor (a backbone stage's activations at 1448x1086, a block of 4D
correlations) is page-faulted in anew, zeroed by the kernel page by page. On a 2-core CPU that
was a third of a 1024x768 extraction. :func:`keep_freed_memory` makes glibc serve large
blocks from its heap and keep freed ones there, so a worker that runs the same shapes again
reuses its memory: its resident size stays near its peak (up to 2 GiB above what is in use)
instead of dropping between calls.
The setting is process-wide and exact (it changes where memory comes from, not a number);
``CVNET_KEEP_FREED_MEMORY=0`` leaves glibc as it is.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

ENV = "CVNET_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters of <malloc.h>
KEEP_FREE_BYTES = 2**31 - 1  # the most mallopt takes: up to 2 GiB of freed heap is kept for reuse


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's heap to keep and reuse large freed blocks, once per process; False where it
    is switched off by ``CVNET_KEEP_FREED_MEMORY=0`` or the C library is not glibc."""
    if os.environ.get(ENV, "1") == "0":
        return False
    return reuse_freed_blocks()


def reuse_freed_blocks() -> bool:
    """The settings of :func:`keep_freed_memory`, applied now (each call); False off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES))

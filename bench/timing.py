"""Timing and peak-memory measurement shared by the benchmarks (Linux /proc)."""
from __future__ import annotations

import ctypes
import gc
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvnet.models.heap import M_MMAP_MAX, M_TRIM_THRESHOLD, keep_freed_memory, reuse_freed_blocks

STATUS = Path("/proc/self/status")


def rss_kib(field: str) -> int:
    """A memory field of this process (``VmRSS``, ``VmHWM``) in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", STATUS.read_text()).group(1))


@dataclass
class Measurement:
    result: Any
    wall: float  # best wall seconds over the repeats
    cpu: float  # best process CPU seconds (all threads)
    peak_mib: float  # peak RSS during the calls
    growth_mib: float  # peak RSS minus the RSS before the calls
    gpu_peak_mib: float | None = None  # torch.cuda.max_memory_allocated during the calls (cuda=True)


def measure(fn: Callable[[], Any], repeats: int, trim_heap: bool = False, cuda: bool = False) -> Measurement:
    """Run ``fn`` ``repeats`` times; the peak RSS counter is reset first (``trim_heap`` also
    hands freed heap back to the kernel, so each mode's peak is its own). With ``cuda`` the
    device is synchronised around each call and its peak allocation recorded too."""
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    if trim_heap:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = rss_kib("VmRSS")
    wall = cpu = float("inf")
    result = None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    peak = rss_kib("VmHWM")
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Measurement(result, wall, cpu, peak / 1024, (peak - base) / 1024, gpu_peak)


M_MMAP_THRESHOLD = -3
HEAPS = ("default heap", "heap reuse")


@contextmanager
def heap_policy(name: str) -> Iterator[None]:
    """Run the calls inside under one of :data:`HEAPS`. ``"heap reuse"`` is cvnet's
    (:func:`cvnet.models.heap.keep_freed_memory`); ``"default heap"`` is glibc's default in
    its steady state, once its dynamic threshold has risen to its 32 MiB maximum: larger blocks
    mapped at malloc and unmapped at free, a freed heap top above 64 MiB trimmed. The steady state
    is the default's best case for repeated large tensors, so the comparison does not flatter reuse."""
    if name not in HEAPS:
        raise ValueError(f"heap must be one of {HEAPS}, got {name!r}")
    keep_freed_memory()
    if name == "heap reuse":
        yield
        return
    libc = ctypes.CDLL("libc.so.6")
    for param, value in ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20), (M_MMAP_MAX, 65536)):
        libc.mallopt(param, value)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        reuse_freed_blocks()


def machine_load() -> str:
    """``os.getloadavg()`` and the core count, for the header of a benchmark table."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores"

"""Numeric precision of inference: exact fp32 by default, bf16 autocast as an opt-in mode.

Every model computation runs under :func:`precision_context`; on the CPU it also sets the
heap to reuse large freed blocks (:func:`cvnet.models.heap.keep_freed_memory`)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from cvnet.models.heap import keep_freed_memory

PRECISIONS = ("fp32", "bf16")


@contextmanager
def _cuda_fp32() -> Iterator[None]:
    """TF32 off in cuDNN convs and in cuBLAS matmuls (the correlation), restored afterwards."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def precision_context(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast, or exact fp32 (TF32 off on CUDA, where cuDNN enables it by default)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cpu":
        keep_freed_memory()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        return _cuda_fp32()
    return nullcontext()

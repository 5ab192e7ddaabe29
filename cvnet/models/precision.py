"""Numeric precision of inference: exact fp32 by default, bf16 autocast as an opt-in mode."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

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
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        return _cuda_fp32()
    return nullcontext()

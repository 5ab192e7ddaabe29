"""Numeric precision of inference: exact fp32 by default, bf16 autocast as an opt-in mode."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("fp32", "bf16")


def precision_context(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast, or exact fp32 (TF32 convs off on CUDA, where cuDNN enables them by default)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    return nullcontext()

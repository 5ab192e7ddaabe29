"""Convolutions with the pointwise op after them fused in, as oneDNN runs them (CPU inference).

A ReLU or a residual add after a conv is one more pass over the conv's output; oneDNN applies
it as each output tile is written. Exact in fp32 (the same sums, rounded once). The ops have
no autograd, so training keeps the plain modules: :func:`serves` says when the fused ops may
stand in for them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def serves(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether the fused ops can stand in for ``conv`` on ``x``: on a CPU, with no autograd, and
    for bf16 only where oneDNN has bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; without
    them its bf16 ops raise, and the plain convs run instead)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    return (x.device.type == "cpu" and not grad and torch.backends.mkldnn.is_available()
            and (x.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def conv_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
               padding: Sequence[int], relu: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` (2D or 3D), plus ``add`` (the output's shape, any strides) when given, then
    ReLU when ``relu``: one op, a new tensor."""
    args = _conv_args(x, weight, bias, stride, padding)
    if add is None:
        return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if relu else "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, add, *args, "add", 1.0, "relu" if relu else None, [], "")


def conv_accumulate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                    padding: Sequence[int], into: torch.Tensor) -> torch.Tensor:
    """``into += conv(x)`` in place, where ``into``'s memory is the conv output's layout."""
    args = _conv_args(x, weight, bias, stride, padding)
    return torch.ops.mkldnn._convolution_pointwise_.binary(into, x, *args, "add", 1.0, None, [], "")


def _conv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
               padding: Sequence[int]) -> tuple:
    """The ops' conv arguments, weights in ``x``'s dtype (bf16 under autocast, which does not see these ops)."""
    bias = None if bias is None else bias.to(x.dtype)
    return weight.to(x.dtype), bias, list(padding), list(stride), [1] * len(stride), 1

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
    """Whether the fused ops can stand in for ``conv`` on ``x``: on a CPU, with no autograd."""
    grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    return x.device.type == "cpu" and not grad and torch.backends.mkldnn.is_available()


def conv_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
               padding: Sequence[int], relu: bool = False, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` (2D or 3D), plus ``add_to`` when given, then ReLU when ``relu``: one op.

    Without ``relu`` the sum is written into ``add_to`` in place (its memory must be the conv
    output's layout) and ``add_to`` is returned. Weights are cast to ``x``'s dtype (bf16 under
    autocast, which does not see these ops)."""
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    args = (weight, bias, list(padding), list(stride), [1] * len(stride), 1)
    ops = torch.ops.mkldnn
    if add_to is None:
        return ops._convolution_pointwise(x, *args, "relu" if relu else "none", [], "")
    if relu:
        return ops._convolution_pointwise.binary(x, add_to, *args, "add", 1.0, "relu", [], "")
    return ops._convolution_pointwise_.binary(add_to, x, *args, "add", 1.0, None, [], "")

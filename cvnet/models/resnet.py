"""pycls-layout ResNet-50/101 (SPEC §1): module names match the reference state dict.

``stem.{conv,bn}``, stages ``s1..s4``, blocks ``b1..bN`` with ``f.{a,a_bn,b,b_bn,c,c_bn}``
and, in ``b1`` only, ``proj`` + ``bn``. Bottleneck v1.5 (stride on the 3x3), BN eps 1e-5.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cvnet.models import onednn

STAGES = ("stem", "s1", "s2", "s3", "s4")  # the trunk's children, input to output
STAGE_DEPTHS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# (output width, bottleneck width, stride) of s1..s4
STAGE_WIDTHS: tuple[tuple[int, int, int], ...] = ((256, 64, 1), (512, 128, 2), (1024, 256, 2), (2048, 512, 2))
BN_EPS = 1e-5
CONV_BN_PAIRS = (("conv", "bn"), ("a", "a_bn"), ("b", "b_bn"), ("c", "c_bn"), ("proj", "bn"))  # in stem and blocks


def stage_depths(depth: int) -> tuple[int, int, int, int]:
    """Blocks per stage for a ResNet ``depth`` (50 or 101)."""
    if depth not in STAGE_DEPTHS:
        raise ValueError(f"unsupported ResNet depth {depth!r}; expected one of {sorted(STAGE_DEPTHS)}")
    return STAGE_DEPTHS[depth]


class ResStem(nn.Module):
    """7x7/2 conv, BN, ReLU, 3x3/2 max pool."""

    def __init__(self, w_out: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(3, w_out, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(w_out, eps=BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class BottleneckTransform(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1, BN after each, ReLU after the first two."""

    def __init__(self, w_in: int, w_out: int, w_b: int, stride: int):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b, eps=BN_EPS)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b, eps=BN_EPS)
        self.b_relu = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b_relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    """Residual bottleneck block: ReLU(shortcut(x) + f(x)); projection shortcut in ``b1``."""

    def __init__(self, w_in: int, w_out: int, w_b: int, stride: int):
        super().__init__()
        self.fuse_pointwise = False  # set on fold_batchnorm's inference copy
        self.proj_block = w_in != w_out or stride != 1
        if self.proj_block:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out, eps=BN_EPS)
        self.f = BottleneckTransform(w_in, w_out, w_b, stride)
        self.relu = nn.ReLU(inplace=True)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x) + shortcut(x)`` before the final ReLU (the reference re-ranking input)."""
        shortcut = self.bn(self.proj(x)) if self.proj_block else x
        return self.f(x).add_(shortcut)  # in place: f's last op (conv or BN) keeps no output for backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_pointwise and onednn.serves(x, self.f.a):
            return self.fused_forward(x)
        return self.relu(self.pre_activation(x))

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of a BatchNorm-folded block with each ReLU and the residual add done by
        oneDNN inside the conv before it (one pass over the output less per op: exact)."""
        a, b, c = self.f.a, self.f.b, self.f.c
        y = onednn.conv_fused(x, a.weight, a.bias, a.stride, a.padding, relu=True)
        y = onednn.conv_fused(y, b.weight, b.bias, b.stride, b.padding, relu=True)
        shortcut = self.proj(x) if self.proj_block else x
        return onednn.conv_fused(y, c.weight, c.bias, c.stride, c.padding, relu=True, add=shortcut)


class ResStage(nn.Module):
    """``depth`` blocks named ``b1..bN``; the first one changes width and stride."""

    def __init__(self, w_in: int, w_out: int, w_b: int, stride: int, depth: int):
        super().__init__()
        for i in range(depth):
            block = ResBlock(w_in if i == 0 else w_out, w_out, w_b, stride if i == 0 else 1)
            self.add_module(f"b{i + 1}", block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x

    def forward_pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The stage output before the last block's final ReLU."""
        blocks = list(self.children())
        for block in blocks[:-1]:
            x = block(x)
        return blocks[-1].pre_activation(x)


class ResNet(nn.Module):
    """The pycls ResNet trunk: ``stem``, ``s1..s4`` (no classifier)."""

    def __init__(self, depth: int = 50):
        super().__init__()
        self.depth = depth
        self.stem = ResStem(64)
        w_in = 64
        for i, (n, (w_out, w_b, stride)) in enumerate(zip(stage_depths(depth), STAGE_WIDTHS)):
            self.add_module(f"s{i + 1}", ResStage(w_in, w_out, w_b, stride, n))
            w_in = w_out

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-4 output (B, 2048, H/32, W/32)."""
        return self.s4(self.s3(self.s2(self.s1(self.stem(x)))))

    def stage3(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-3 output before its last ReLU (B, 1024, ceil(H/16), ceil(W/16))."""
        return self.s3.forward_pre_activation(self.s2(self.s1(self.stem(x))))


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode inference copy of ``net`` with each BatchNorm folded into the conv before it.

    The copy computes the same function as ``net.eval()`` (to float rounding: about 1e-8 on
    the trunk output) with one pass less per conv, and its blocks run each ReLU and residual add
    inside the conv before it on a CPU (:mod:`cvnet.models.onednn`); ``net`` itself, which
    training uses, is left as it is. Conv weights keep their memory format (channels_last stays channels_last).
    """
    folded = copy.deepcopy(net).eval().requires_grad_(False)
    for module in folded.modules():
        for conv_name, bn_name in CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused = fuse_conv_bn_eval(conv, bn)
                if conv.weight.is_contiguous(memory_format=torch.channels_last):
                    fused.to(memory_format=torch.channels_last)
                setattr(module, conv_name, fused)
                setattr(module, bn_name, nn.Identity())
        if isinstance(module, ResBlock):
            module.fuse_pointwise = True
    return folded

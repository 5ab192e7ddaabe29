"""Center-pivot 4D convolution (HSNet / CVNet) on correlation tensors (B, C, hq, wq, hk, wk).

A center-pivot 4D conv is the sum of two 2D convs: ``conv1`` over the query dims at each
(strided) key position and ``conv2`` over the key dims at each (strided) query position.
Because each conv only reads a strided slice of the input, :meth:`CenterPivotConv4d.
forward_slices` takes those two slices directly, so callers that can produce them cheaply
never build the full 4D tensor.
"""
from __future__ import annotations

import torch
from torch import nn


def subsample_key(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Keep key positions 0, stride, 2*stride, ... of a (B, C, hq, wq, hk, wk) tensor."""
    return x[..., ::stride, ::stride] if stride > 1 else x


def subsample_query(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Keep query positions 0, stride, 2*stride, ... of a (B, C, hq, wq, hk, wk) tensor."""
    return x[:, :, ::stride, ::stride] if stride > 1 else x


class CenterPivotConv4d(nn.Module):
    """4D conv with kernel ``k``, stride ``stride`` on all four dims and padding ``k // 2``.

    Output size per dim is ``ceil(n / stride)``. Submodule names (``conv1``, ``conv2``) match
    the reference state dict.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve a full (B, C, hq, wq, hk, wk) tensor."""
        return self.forward_slices(subsample_key(x, self.stride), subsample_query(x, self.stride))

    def forward_slices(self, key_sub: torch.Tensor, query_sub: torch.Tensor) -> torch.Tensor:
        """Convolve from the two strided slices of the input.

        ``key_sub``: (B, C, hq, wq, hk', wk'), the input at strided key positions (for conv1);
        ``query_sub``: (B, C, hq', wq', hk, wk), the input at strided query positions (conv2).
        """
        b, c, hq, wq, hk_s, wk_s = key_sub.shape
        x1 = key_sub.permute(0, 4, 5, 1, 2, 3).reshape(b * hk_s * wk_s, c, hq, wq)
        y1 = self.conv1(x1)
        o, ohq, owq = y1.shape[1:]
        y1 = y1.view(b, hk_s, wk_s, o, ohq, owq).permute(0, 3, 4, 5, 1, 2)

        _, _, hq_s, wq_s, hk, wk = query_sub.shape
        x2 = query_sub.permute(0, 2, 3, 1, 4, 5).reshape(b * hq_s * wq_s, c, hk, wk)
        y2 = self.conv2(x2)
        ohk, owk = y2.shape[2:]
        y2 = y2.view(b, hq_s, wq_s, o, ohk, owk).permute(0, 3, 1, 2, 4, 5)
        if y1.shape != y2.shape:
            raise ValueError(
                f"center-pivot conv slices disagree: conv1 gives {tuple(y1.shape)}, "
                f"conv2 gives {tuple(y2.shape)}"
            )
        return (y1 + y2).contiguous()

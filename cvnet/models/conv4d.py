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

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation step by step (HSNet/CVNet code): subsample, permute each
        side to a contiguous NCHW batch, conv, permute back, add. Contiguous (B, O, ...) output."""
        s = self.stride
        key_sub, query_sub = subsample_key(x, s), subsample_query(x, s)
        b, c, hq, wq, hk_s, wk_s = key_sub.shape
        y1 = self.conv1(key_sub.permute(0, 4, 5, 1, 2, 3).contiguous().view(-1, c, hq, wq))
        y1 = y1.view(b, hk_s, wk_s, *y1.shape[1:]).permute(0, 3, 4, 5, 1, 2).contiguous()
        _, _, hq_s, wq_s, hk, wk = query_sub.shape
        y2 = self.conv2(query_sub.permute(0, 2, 3, 1, 4, 5).contiguous().view(-1, c, hk, wk))
        y2 = y2.view(b, hq_s, wq_s, *y2.shape[1:]).permute(0, 3, 1, 2, 4, 5).contiguous()
        return y1 + y2

    def forward_slices(self, key_sub: torch.Tensor, query_sub: torch.Tensor) -> torch.Tensor:
        """Convolve from the two strided slices of the input.

        ``key_sub``: (B, C, hq, wq, hk', wk'), the input at strided key positions (for conv1);
        ``query_sub``: (B, C, hq', wq', hk, wk), at strided query positions (for conv2). Any
        memory layout works; the result (B, O, hq', wq', hk', wk') has channels innermost in
        memory, which makes the next layer's conv inputs channels-last views.
        """
        b, _, _, _, hk_s, wk_s = key_sub.shape
        hq_s, wq_s = query_sub.shape[2:4]
        y1 = self.conv1(_conv_batch(key_sub.permute(0, 4, 5, 1, 2, 3)))
        y2 = self.conv2(_conv_batch(query_sub.permute(0, 2, 3, 1, 4, 5)))
        y1 = y1.unflatten(0, (b, hk_s, wk_s)).permute(0, 4, 5, 1, 2, 3)  # (B, hq', wq', hk', wk', O)
        y2 = y2.unflatten(0, (b, hq_s, wq_s)).permute(0, 1, 2, 4, 5, 3)
        if y1.shape != y2.shape:
            raise ValueError(
                f"center-pivot conv slices disagree: conv1 gives {tuple(y1.shape)}, conv2 gives {tuple(y2.shape)}"
            )
        out = torch.empty(y1.shape, dtype=y1.dtype, device=y1.device)  # channels innermost
        return out.copy_(y2).add_(y1).permute(0, 5, 1, 2, 3, 4)  # (autograd records no out= ops)


def _conv_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, p, q, C, h, w) -> a (B*p*q, C, h, w) conv batch without a copy when it is NCHW already,
    else copied to channels-last memory (the layout oneDNN convs run fastest)."""
    b, p, q, c, h, w = x.shape
    if x.is_contiguous():
        return x.reshape(b * p * q, c, h, w)
    return x.permute(0, 1, 2, 4, 5, 3).reshape(b * p * q, h, w, c).permute(0, 3, 1, 2)


class GroupNorm4d(nn.GroupNorm):
    """``nn.GroupNorm`` for (B, C, *spatial) tensors in any memory layout; keeps channels innermost.

    Same parameters and state-dict names as ``nn.GroupNorm``; avoids the contiguous copy that
    ``nn.GroupNorm`` makes of channel-innermost 4D correlation tensors.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        groups = self.num_groups
        channels_last = x.movedim(1, -1)
        # elementwise passes run on rows tiled over the innermost spatial dim (long rows)
        tile = channels_last.shape[-2]
        rows = channels_last.reshape(b, -1, tile * c)

        def tiled(per_channel: torch.Tensor) -> torch.Tensor:
            return per_channel.reshape(b, 1, c).repeat(1, 1, tile)

        # exact two-pass statistics per channel (mean, then the squares of the centered values
        # as the diagonal of one small matmul), combined into group statistics
        mean_c = rows.view(b, -1, c).mean(1)
        centered = rows - tiled(mean_c)
        by_channel = centered.view(b, -1, c)
        var_c = torch.diagonal(torch.bmm(by_channel.transpose(1, 2), by_channel), dim1=1, dim2=2) / by_channel.shape[1]
        mean_c, var_c = mean_c.view(b, groups, -1), var_c.view(b, groups, -1)
        mean_g = mean_c.mean(-1, keepdim=True)
        var_g = var_c.mean(-1, keepdim=True) + mean_c.var(-1, unbiased=False, keepdim=True)
        scale = torch.rsqrt(var_g + self.eps) * self.weight.view(groups, -1)
        shift = self.bias.view(groups, -1) + (mean_c - mean_g) * scale
        out = torch.addcmul(tiled(shift), centered, tiled(scale))
        return out.view(channels_last.shape).movedim(-1, 1)

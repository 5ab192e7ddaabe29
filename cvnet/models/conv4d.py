"""Center-pivot 4D convolution (HSNet / CVNet) on correlation tensors (B, C, hq, wq, hk, wk).

A center-pivot 4D conv is the sum of two 2D convs: ``conv1`` over the query dims at each
(strided) key position and ``conv2`` over the key dims at each (strided) query position.
Because each conv only reads a strided slice of the input, :meth:`CenterPivotConv4d.
forward_slices` takes those two slices directly, so callers that can produce them cheaply
never build the full 4D tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cvnet.models import onednn


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
        ``query_sub``: (B, C, hq', wq', hk, wk), at strided query positions (for conv2). Each
        conv runs as one channels-last ``conv3d`` (kernel k x k x 1 or 1 x k x k) on a view of
        its input when the memory allows one (channels innermost, the convolved dims and the
        other two each contiguous), so no layout conversion is made between the two pivot
        directions. The result (B, O, hq', wq', hk', wk') has its channels innermost and dense:
        memory (B, hq', wq', hk', wk', O), or at CPU inference, where conv2 adds conv1's output
        inside its conv, conv2's output layout (key dims first when the slices' layouts differ).
        """
        y1 = _pivot_conv(self.conv1, key_sub, query_dims=True)
        b, _, hq_s, wq_s, hk, wk = query_sub.shape
        y2_shape = (b, self.conv2.out_channels, hq_s, wq_s, _conv_size(hk, self.conv2), _conv_size(wk, self.conv2))
        if y1.shape != y2_shape:
            raise ValueError(
                f"center-pivot conv slices disagree: conv1 gives {tuple(y1.shape)}, conv2 gives {y2_shape}"
            )
        if onednn.serves(query_sub, self.conv2) and channels_innermost(y1):
            # CPU inference: y1 (dense, channels innermost) is added inside conv2
            return _pivot_conv(self.conv2, query_sub, query_dims=False, add_to=y1)
        y2 = _pivot_conv(self.conv2, query_sub, query_dims=False)
        if _is_natural(y1):
            return y1.add_(y2)  # conv outputs are not saved for backward: in-place is safe
        if _is_natural(y2):
            return y2.add_(y1)
        return _natural_empty(y1).copy_(y1).add_(y2)


# dims of a (B, C, hq, wq, hk, wk) tensor: the query pair and the key pair
_QUERY, _KEY = (2, 3), (4, 5)


def memory_order(x: torch.Tensor) -> tuple[int, ...]:
    """(B, C, *spatial) ``x``'s dims as its memory holds them, channels last: the permutation
    that makes a dense channels-innermost ``x`` contiguous whatever its spatial order."""
    return (0, *sorted(range(2, x.dim()), key=lambda d: -x.stride(d)), 1)


def channels_innermost(x: torch.Tensor) -> bool:
    """True when (B, C, *spatial) ``x`` is dense with its channels innermost, in any spatial order."""
    return x.permute(memory_order(x)).is_contiguous()


def _is_natural(x: torch.Tensor) -> bool:
    """True when (B, C, hq, wq, hk, wk) ``x`` has memory (B, hq, wq, hk, wk, C)."""
    return x.permute(0, 2, 3, 4, 5, 1).is_contiguous()


def _natural_empty(x: torch.Tensor) -> torch.Tensor:
    b, c, *spatial = x.shape
    return torch.empty(b, *spatial, c, dtype=x.dtype, device=x.device).movedim(-1, 1)


def _conv3d_view(x: torch.Tensor, groups: tuple[tuple[int, ...], ...], copy: bool) -> torch.Tensor | None:
    """``x`` (B, C, 4 dims) as a channels-last (B, C, D, H, W) whose D, H, W merge the dim
    ``groups``; a view, or None when none exists (a channels-last copy when ``copy``)."""
    perm = (0, *(d for group in groups for d in group), 1)
    shape = (x.shape[0], *(math.prod(x.shape[d] for d in group) for group in groups), x.shape[1])
    moved = x.permute(perm)
    if copy:
        return moved.reshape(shape).permute(0, 4, 1, 2, 3)
    # a view that is not dense channels-last would make the conv copy anyway
    return moved.view(shape).permute(0, 4, 1, 2, 3) if moved.is_contiguous() else None


def _conv_size(n: int, conv: nn.Conv2d) -> int:
    """Output size of ``conv`` along a dim of input size ``n``."""
    return (n + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1


def _pivot_conv(conv: nn.Conv2d, x: torch.Tensor, query_dims: bool, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``conv`` over the query dims (``query_dims``) or the key dims of (B, C, hq, wq, hk, wk)
    ``x`` at every position of the other two, as one channels-last ``conv3d``; with ``add_to``
    (the other pivot direction's output, same shape; CPU inference only) plus ``add_to``.

    The two convolved dims become D, H and the other two are merged into W (kernel k x k x 1),
    or the other two are merged into D (kernel 1 x k x k): whichever is a view of ``x``'s
    memory; else ``x`` is copied to the layout that keeps (hq, wq, hk, wk) in that order.
    oneDNN adds ``add_to`` as it writes each output tile: into ``add_to`` itself where its memory
    is the conv's output layout (no new tensor), else reading it in its own layout (no separate
    add pass over the two layouts).
    """
    conv_dims, other = (_QUERY, _KEY) if query_dims else (_KEY, _QUERY)
    layouts = [((conv_dims[0],), (conv_dims[1],), other), (other, (conv_dims[0],), (conv_dims[1],))]
    if not query_dims:
        layouts.reverse()  # the natural-order layout first: it is the copy when no view exists
    for groups in layouts:
        view = _conv3d_view(x, groups, copy=False)
        if view is not None:
            break
    else:
        groups = layouts[0]
        view = _conv3d_view(x, groups, copy=True)
    merged_first = len(groups[0]) == 2
    s, p = conv.stride[0], conv.padding[0]
    weight = conv.weight.unsqueeze(2 if merged_first else 4)
    stride, padding = ((1, s, s), (0, p, p)) if merged_first else ((s, s, 1), (p, p, 0))
    if add_to is None:
        y = F.conv3d(view, weight, conv.bias, stride, padding)
    else:  # CPU inference: add_to is added inside the conv, in place where its memory is the output's layout
        target = _conv3d_view(add_to, groups, copy=False)
        if target is not None:
            onednn.conv_accumulate(view, weight, conv.bias, stride, padding, into=target)
            return add_to
        if view.dtype == torch.float32:  # measured: in fp32 a separate add across the layouts is faster
            return add_to.add_(_pivot_conv(conv, x, query_dims))
        y = onednn.conv_fused(view, weight, conv.bias, stride, padding, add=_conv3d_view(add_to, groups, copy=True))
    b, o = y.shape[:2]
    out_dims = y.shape[2:]
    if merged_first:
        y = y.view(b, o, x.shape[other[0]], x.shape[other[1]], *out_dims[1:])
    else:
        y = y.view(b, o, *out_dims[:2], x.shape[other[0]], x.shape[other[1]])
    # y's dims follow ``groups``; put them back in (hq, wq, hk, wk) order
    order = [d for group in groups for d in group]
    return y.permute(0, 1, *(2 + order.index(d) for d in (2, 3, 4, 5)))


def relu_(x: torch.Tensor) -> torch.Tensor:
    """``x.relu_()``. A bf16 CPU tensor outside autograd is clamped through its int16 view,
    which zeroes exactly the values with the sign bit set (measured 5x faster than bf16's own
    clamp, bit-identical except that a negative NaN becomes 0)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        x.view(torch.int16).clamp_(min=0)
        return x
    return x.relu_()


class ReLU4d(nn.ReLU):
    """``nn.ReLU(inplace=True)`` through :func:`relu_`."""

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_(x)


class GroupNorm4d(nn.GroupNorm):
    """``nn.GroupNorm`` for (B, C, *spatial) tensors in any memory layout; keeps channels innermost.

    Same parameters and state-dict names as ``nn.GroupNorm``; avoids the contiguous copy that
    ``nn.GroupNorm`` makes of channel-innermost 4D correlation tensors. With ``inplace=True``
    (as ``nn.ReLU``'s) and no autograd it overwrites its input when that is channels-innermost
    contiguous (a conv output nothing else reads): two fewer passes and no new 4D tensors.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, inplace: bool = False) -> None:
        super().__init__(num_groups, num_channels, eps)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        groups = self.num_groups
        in_place = self.inplace and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        order = memory_order(x)
        channels_last = x.permute(order)
        # elementwise passes run on rows tiled over the innermost spatial dim (long rows)
        tile = channels_last.shape[-2]
        rows = channels_last.reshape(b, -1, tile * c)
        in_place = in_place and rows.data_ptr() == x.data_ptr() and channels_last.is_contiguous()

        def tiled(per_channel: torch.Tensor) -> torch.Tensor:
            # in x's dtype: a bf16 pass with an fp32 operand would make fp32 copies of x
            return per_channel.reshape(b, 1, c).repeat(1, 1, tile).to(x.dtype)

        # exact two-pass statistics per channel (mean, then the squares of the centered values),
        # combined into group statistics
        mean_c = _channel_sums(rows.view(b, -1, c), squared=False) / (rows.numel() // (b * c))
        centered = rows.sub_(tiled(mean_c)) if in_place else rows - tiled(mean_c)
        by_channel = centered.view(b, -1, c)
        var_c = _channel_sums(by_channel, squared=True) / by_channel.shape[1]
        mean_c, var_c = mean_c.view(b, groups, -1), var_c.view(b, groups, -1)
        mean_g = mean_c.mean(-1, keepdim=True)
        var_g = var_c.mean(-1, keepdim=True) + mean_c.var(-1, unbiased=False, keepdim=True)
        scale = torch.rsqrt(var_g + self.eps) * self.weight.view(groups, -1)
        shift = self.bias.view(groups, -1) + (mean_c - mean_g) * scale
        if in_place:
            out = torch.addcmul(tiled(shift), centered, tiled(scale), out=centered)
        else:
            out = torch.addcmul(tiled(shift), centered, tiled(scale))
        return out.view(channels_last.shape).permute([order.index(d) for d in range(x.dim())])


CAST_ELEMENTS = 1 << 18  # a low-precision tensor is cast to fp32 this many elements at a time (1 MiB)


def _channel_sums(x: torch.Tensor, squared: bool) -> torch.Tensor:
    """Per (batch, channel) sums (B, C) in fp32 of (B, N, C) ``x``, or of its squares (the
    diagonal of ``x^T x``). A bf16 ``x`` is cast in row chunks that stay in cache, not as one
    fp32 copy."""
    rows = x.shape[1] if x.dtype == torch.float32 else max(1, CAST_ELEMENTS // (x.shape[0] * x.shape[2]))
    total = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float32, device=x.device)
    with torch.autocast(x.device.type, enabled=False):  # fp32 statistics in bf16 mode too
        for chunk in x.split(rows, dim=1):
            chunk = chunk.float()
            if squared:
                total += torch.diagonal(torch.bmm(chunk.transpose(1, 2), chunk), dim1=1, dim2=2)
            else:
                total += chunk.sum(1)
    return total

"""CVNet cross-scale correlation: scale pyramid, cosine correlation, 4D interpolation.

Two formulations of the same tensor (SPEC-cvnet.md section 3):

- reference: :func:`correlation_4d` builds the full (9, hq, wq, hk, wk) tensor step by step as
  the authors' code does (per-scale cosine, 4D bilinear resize over query then key dims, clamp).
- fast: per image, :func:`pyramid_levels` gives the three conv'd levels unit-normalised per
  position; bilinear interpolation commutes with the dot product, so :func:`correlation_slices`
  yields exactly the strided slices the learner's first layer reads, as batched matmuls,
  without the 4D tensor.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvnet.models.conv4d import relu_

PYRAMID_SCALES: tuple[float, ...] = (0.25, 0.5, 1.0)
COSINE_EPS = 1e-8


def pyramid_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Sizes of the pyramid levels of an (h, w) map; Python ``round`` (half to even)."""
    return [(round(h * math.sqrt(s)), round(w * math.sqrt(s))) for s in PYRAMID_SCALES]


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) with ``align_corners=True`` (the same size is the identity)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def scale_pyramid(feature_map: torch.Tensor, conv2ds: nn.ModuleList) -> list[torch.Tensor]:
    """Per-scale conv'd maps of a (N, 1024, h, w) feature map: a list of (N, 256, h_s, w_s)."""
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must be (N, C, h, w), got shape {tuple(feature_map.shape)}")
    sizes = pyramid_sizes(*feature_map.shape[-2:])
    return [conv(resize_bilinear(feature_map, size)) for size, conv in zip(sizes, conv2ds)]


def unit_normalise(x: torch.Tensor) -> torch.Tensor:
    """Divide (N, C, h, w) by its per-position L2 norm over C (all-zero positions stay zero).

    Dot products of unit vectors equal the reference cosine ``dot / (|q| |k| + 1e-8)`` up to a
    relative 1e-8 / (|q| |k|): negligible for conv'd features (norms are O(1) or larger).
    """
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)


def pyramid_levels(feature_map: torch.Tensor, conv2ds: nn.ModuleList) -> list[torch.Tensor]:
    """:func:`scale_pyramid` with every position unit-normalised: the per-image rerank input."""
    return [unit_normalise(level) for level in scale_pyramid(feature_map, conv2ds)]


def cosine_correlation(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Reference cosine ``dot / (|q| |k| + 1e-8)`` of (N, C, hq, wq) and (N, C, hk, wk).

    Returns (N, hq, wq, hk, wk).
    """
    n, c, hq, wq = query.shape
    hk, wk = key.shape[-2:]
    q = query.reshape(n, c, -1).transpose(1, 2)
    k = key.reshape(n, c, -1)
    q_norm = q.norm(p=2, dim=2, keepdim=True)
    k_norm = k.norm(p=2, dim=1, keepdim=True)
    corr = torch.bmm(q, k) / (torch.bmm(q_norm, k_norm) + COSINE_EPS)
    return corr.view(n, hq, wq, hk, wk)


def interpolate4d(corr: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (align_corners) resize of (N, hq, wq, hk, wk) to ``size``: query dims, then key dims."""
    n, hq, wq, hk, wk = corr.shape
    out_hq, out_wq, out_hk, out_wk = size
    x = corr.view(n, hq, wq, hk * wk).permute(0, 3, 1, 2)
    x = resize_bilinear(x, (out_hq, out_wq))
    x = x.permute(0, 2, 3, 1).reshape(n, out_hq * out_wq, hk, wk)
    x = resize_bilinear(x, (out_hk, out_wk))
    return x.view(n, out_hq, out_wq, out_hk, out_wk)


def correlation_4d(query_map: torch.Tensor, key_map: torch.Tensor, conv2ds: nn.ModuleList) -> torch.Tensor:
    """Reference cross-scale correlation of two (1024, h, w) maps: (9, hq, wq, hk, wk), clamped at 0.

    Channel ``c = 3 * i + j`` for query scale i and key scale j.
    """
    query_levels = scale_pyramid(query_map.unsqueeze(0), conv2ds)
    key_levels = scale_pyramid(key_map.unsqueeze(0), conv2ds)
    size = (*query_map.shape[-2:], *key_map.shape[-2:])
    channels = [
        interpolate4d(cosine_correlation(q, k), size)[0] for q in query_levels for k in key_levels
    ]
    return torch.stack(channels).clamp(min=0)


def _strided_upsampled(levels: Sequence[torch.Tensor], size: tuple[int, int], stride: int) -> torch.Tensor:
    """Levels (N, C, h_s, w_s) resized to ``size`` and kept at positions 0, stride, ...: (N, S, C, h', w')."""
    return torch.stack([resize_bilinear(level, size)[..., ::stride, ::stride] for level in levels], dim=1)


def interpolation_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of 1D linear interpolation with ``align_corners=True``."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, dtype=torch.float64) * scale
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix


def resize_leading(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`resize_bilinear` over dims 1, 2 of (N, h, w, M) as two matmuls (M maps at once,
    each output written once and contiguous; several times faster than ``F.interpolate``)."""
    n, h, w, m = x.shape
    if (h, w) == tuple(size):
        return x
    like = {"dtype": x.dtype, "device": x.device}
    rows = interpolation_matrix(size[0], h).to(**like)
    cols = interpolation_matrix(size[1], w).to(**like)
    x = torch.matmul(rows, x.reshape(n, h, w * m))  # (N, H, w * M)
    return torch.matmul(cols, x.view(n * size[0], w, m)).view(n, *size, m)


def _pivot_side(full_levels: Sequence[torch.Tensor], strided_levels: Sequence[torch.Tensor], stride: int,
                full_is_query: bool) -> torch.Tensor:
    """The clamped correlation at every position of the full side and the strided positions of
    the other, memory (B, h, w, h', w', 9) with channel ``3 * query_level + key_level``.

    Each full-side level is one matmul against the strided side (upsampled, rows (h', w', S)),
    then resized to full size along its leading dims; the S results stack into channels.
    """
    c = full_levels[0].shape[1]
    full_size = tuple(full_levels[-1].shape[-2:])
    strided = _strided_upsampled(strided_levels, tuple(strided_levels[-1].shape[-2:]), stride)
    bs, s, _, h_s, w_s = strided.shape
    rows = strided.permute(0, 2, 3, 4, 1).reshape(bs, c, -1)  # (Bs, C, h' * w' * S)
    if bs == 1:
        rows = rows[0]  # one strided image: each level's matmul is a single mm over all its images
    blocks = []
    for level in full_levels:
        positions = level.reshape(level.shape[0], c, -1).transpose(1, 2)  # (Bf, h_s * w_s, C)
        corr = torch.matmul(positions, rows)
        corr = corr.view(corr.shape[0], *level.shape[-2:], -1)
        blocks.append(resize_leading(corr, full_size).view(-1, *full_size, h_s, w_s, s))
    # full side's level is the channel's major index on the query side, its minor one on the key side
    stacked = torch.stack(blocks, dim=-2 if full_is_query else -1)
    return relu_(stacked.view(*stacked.shape[:5], s * s))


def correlation_slices(
    query_levels: Sequence[torch.Tensor], key_levels: Sequence[torch.Tensor], stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two strided slices of the clamped 9-channel correlation that a center-pivot conv reads.

    ``query_levels``: S tensors (1, C, hq_s, wq_s), one query's unit-normalised pyramid;
    ``key_levels``: S tensors (B, C, hk_s, wk_s), B keys of one size. Returns ``key_sub``
    (B, 9, hq, wq, hk', wk'), the correlation at key positions 0, stride, ... (conv1's input),
    and ``query_sub`` (B, 9, hq', wq', hk, wk), at query positions 0, stride, ... (conv2's input).

    Interpolation commutes with the dot product, so each (i, j) block is one matmul of the
    strided side, upsampled, against the other side at its native size, then resized to full
    size (fewer flops than upsampling both). Memory: (B, hq, wq, hk', wk', 9) and
    (B, hk, wk, hq', wq', 9), channels innermost and the convolved dims outermost, which
    :meth:`CenterPivotConv4d.forward_slices` convolves without a layout copy.
    """
    key_sub = _pivot_side(query_levels, key_levels, stride, full_is_query=True)
    query_sub = _pivot_side(key_levels, query_levels, stride, full_is_query=False)
    return key_sub.permute(0, 5, 1, 2, 3, 4), query_sub.permute(0, 5, 3, 4, 1, 2)

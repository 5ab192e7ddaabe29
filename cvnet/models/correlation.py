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


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`resize_bilinear` of many single-channel maps (N, h, w) as two small matmuls, which
    is several times faster than ``F.interpolate`` for thousands of maps."""
    h, w = maps.shape[-2:]
    if (h, w) == tuple(size):
        return maps
    like = {"dtype": maps.dtype, "device": maps.device}
    rows = interpolation_matrix(size[0], h).to(**like)
    cols = interpolation_matrix(size[1], w).to(**like)
    return torch.matmul(rows, maps @ cols.T)


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``t`` produces here (autocast's when it is on)."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


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
    size (fewer flops than upsampling both). The results are written straight into the NCHW
    batches the convs read: memory (B, hk', wk', 9, hq, wq) and (B, hq', wq', 9, hk, wk).
    """
    b, c = key_levels[0].shape[:2]
    s = len(query_levels)
    q_size, k_size = tuple(query_levels[-1].shape[-2:]), tuple(key_levels[-1].shape[-2:])
    q_strided = _strided_upsampled(query_levels, q_size, stride)[0]  # (S, C, hq', wq')
    k_strided = _strided_upsampled(key_levels, k_size, stride)  # (B, S, C, hk', wk')
    hq_s, wq_s = q_strided.shape[-2:]
    hk_s, wk_s = k_strided.shape[-2:]
    like = {"dtype": _matmul_dtype(key_levels[0]), "device": key_levels[0].device}

    # key_sub block (i, j): keys at strided positions (rows B, hk', wk', j) x query level i
    key_sub = torch.empty(b, hk_s * wk_s, s, s, q_size[0] * q_size[1], **like)
    rows = k_strided.permute(0, 3, 4, 1, 2).reshape(-1, c)
    for i, level in enumerate(query_levels):
        corr = (rows @ level.reshape(c, -1)).view(-1, *level.shape[-2:])
        key_sub[:, :, i] = resize_maps(corr, q_size).view(b, hk_s * wk_s, s, -1).clamp(min=0)
    key_sub = key_sub.view(b, hk_s, wk_s, s * s, *q_size).permute(0, 3, 4, 5, 1, 2)

    # query_sub block (i, j): query at strided positions (rows hq', wq', i) x key level j
    query_sub = torch.empty(b, hq_s * wq_s, s, s, k_size[0] * k_size[1], **like)
    rows = q_strided.permute(2, 3, 0, 1).reshape(1, -1, c).expand(b, -1, -1)
    for j, level in enumerate(key_levels):
        corr = torch.bmm(rows, level.reshape(b, c, -1)).view(-1, *level.shape[-2:])
        query_sub[:, :, :, j] = resize_maps(corr, k_size).view(b, hq_s * wq_s, s, -1).clamp(min=0)
    query_sub = query_sub.view(b, hq_s, wq_s, s * s, *k_size).permute(0, 3, 1, 2, 4, 5)
    return key_sub, query_sub

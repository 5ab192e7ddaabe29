"""CVNet cross-scale correlation: scale pyramid, cosine correlation, 4D interpolation.

Two formulations of the same tensor (SPEC-cvnet.md section 3):

- reference: :func:`correlation_4d` builds the full (9, hq, wq, hk, wk) tensor step by step as
  the authors' code does (per-scale cosine, 4D bilinear resize over query then key dims, clamp).
- fast: per image, :func:`pyramid_levels` gives the three conv'd levels unit-normalised per
  position; bilinear interpolation commutes with the dot product, so :func:`upsample_levels`
  plus :func:`correlation_slices` yield exactly the strided slices the learner's first layer
  reads, as batched matmuls, without the 4D tensor.
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
    """Bilinear resize of (N, C, h, w) with ``align_corners=True``."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def scale_pyramid(feature_map: torch.Tensor, conv2ds: nn.ModuleList) -> list[torch.Tensor]:
    """Per-scale conv'd maps of a (N, 1024, h, w) feature map: a list of (N, 256, h_s, w_s)."""
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must be (N, C, h, w), got shape {tuple(feature_map.shape)}")
    sizes = pyramid_sizes(*feature_map.shape[-2:])
    return [conv(resize_bilinear(feature_map, size)) for size, conv in zip(sizes, conv2ds)]


def unit_normalise(x: torch.Tensor) -> torch.Tensor:
    """Divide (N, C, h, w) by its per-position L2 norm over C (all-zero positions stay zero)."""
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


def upsample_levels(levels: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Resize unit-normalised levels, each (N, C, h_s, w_s), to ``size``: (N, S, C, h, w)."""
    return torch.stack([resize_bilinear(level, size) for level in levels], dim=1)


def correlation_slices(
    query_full: torch.Tensor, keys_full: torch.Tensor, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two strided slices of the clamped 9-channel correlation that a center-pivot conv reads.

    ``query_full``: (S, C, hq, wq), one query's upsampled levels; ``keys_full``: (B, S, C, hk, wk),
    B keys of one size. Returns ``key_sub`` (B, 9, hq, wq, hk', wk'), the correlation at key
    positions 0, stride, ... (conv1's input), and ``query_sub`` (B, 9, hq', wq', hk, wk), at query
    positions 0, stride, ... (conv2's input). Each is one matmul whose result is already the
    NCHW batch its conv reads (memory (B, hk', wk', 9, hq, wq) and (B, hq', wq', 9, hk, wk)).
    """
    s, c, hq, wq = query_full.shape
    b, _, _, hk, wk = keys_full.shape
    keys_sub = keys_full[..., ::stride, ::stride]
    hk_s, wk_s = keys_sub.shape[-2:]
    queries_sub = query_full[..., ::stride, ::stride]
    hq_s, wq_s = queries_sub.shape[-2:]

    # rows (B, hk', wk', j) x cols (i, hq*wq), then swap i and j in place of the clamp's copy
    rows = keys_sub.permute(0, 3, 4, 1, 2).reshape(-1, c)
    cols = query_full.reshape(s, c, -1).transpose(0, 1).reshape(c, -1)
    key_major = (rows @ cols).view(b, hk_s * wk_s, s, s, hq * wq).transpose(2, 3)
    key_sub = torch.clamp(key_major, min=0, out=torch.empty(key_major.shape, dtype=key_major.dtype, device=key_major.device))
    key_sub = key_sub.view(b, hk_s, wk_s, s * s, hq, wq).permute(0, 3, 4, 5, 1, 2)

    # rows (hq', wq', i) x cols (j, hk*wk), batched over the B keys: c = 3 * i + j already
    rows = queries_sub.permute(2, 3, 0, 1).reshape(1, -1, c).expand(b, -1, -1)
    cols = keys_full.reshape(b, s, c, -1).transpose(1, 2).reshape(b, c, -1)
    query_sub = torch.bmm(rows, cols).clamp_(min=0).view(b, hq_s, wq_s, s * s, hk, wk).permute(0, 3, 1, 2, 4, 5)
    return key_sub, query_sub

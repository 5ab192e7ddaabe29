"""CVNet-Rerank: per-image rerank features, the CVLearner, and match probabilities.

Public contract (used by the CVNet model class):

- :func:`make_conv2ds` and :class:`CVLearner` hold the reference weights (state-dict names
  ``conv2ds.{i}.weight`` and ``cv_learner.*``).
- :func:`compute_rerank_features` does all per-image work once; :class:`RerankFeatures` is
  cacheable and serialises to bytes without pickle.
- :func:`match_probability` is the fast exact path, batched over the candidates of one query;
  :func:`key_major_probability` the same path batched over the queries of one candidate;
  :func:`match_probability_reference` follows the reference structure step by step (oracle).
"""
from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cvnet.models.conv4d import CenterPivotConv4d, GroupNorm4d, ReLU4d
from cvnet.models.correlation import (
    PYRAMID_SCALES,
    correlation_4d,
    correlation_slices,
    pyramid_levels,
    pyramid_sizes,
)
from cvnet.models.precision import precision_context

FEATURE_CHANNELS = 1024
LEVEL_CHANNELS = 256
MAX_BATCH_POSITIONS = 1 << 25  # 4D positions per batch: 3 pairs of 48x64 maps (about 1 GiB peak)


def make_conv2ds() -> nn.ModuleList:
    """The per-scale convs: 3 x Conv2d(1024, 256, 3, padding=1, bias=False)."""
    return nn.ModuleList(
        nn.Conv2d(FEATURE_CHANNELS, LEVEL_CHANNELS, 3, padding=1, bias=False) for _ in PYRAMID_SCALES
    )


def _building_block(in_channels: int, out_channels: Sequence[int], kernel: int, strides: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_ch, stride in zip(out_channels, strides):
        layers += [CenterPivotConv4d(in_channels, out_ch, kernel, stride), GroupNorm4d(4, out_ch, inplace=True), ReLU4d()]
        in_channels = out_ch
    return nn.Sequential(*layers)


class CVLearner(nn.Module):
    """Four blocks of center-pivot 4D convs + GroupNorm + ReLU, mean pooling, then an MLP to 2 logits."""

    def __init__(self) -> None:
        super().__init__()
        n_in = len(PYRAMID_SCALES) ** 2
        self.block1 = _building_block(n_in, [16], 5, [2])
        self.block2 = _building_block(16, [16, 32], 3, [1, 2])
        self.block3 = _building_block(32, [32, 32, 64], 3, [1, 1, 2])
        self.block4 = _building_block(64, [64, 64, 128], 3, [1, 1, 1])
        self.mlp = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))

    def forward(self, corr: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) of a full correlation (B, 9, hq, wq, hk, wk)."""
        return self._tail(self.block1(corr))

    def forward_slices(self, key_sub: torch.Tensor, query_sub: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) from the two strided correlation slices block1's first conv reads."""
        return self._tail(self.block1[1:](self.block1[0].forward_slices(key_sub, query_sub)))

    def forward_reference(self, corr: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) computed as the reference code does, layer by layer on contiguous
        tensors (``CenterPivotConv4d.forward_reference``, ``nn.GroupNorm``): the oracle."""
        x = corr
        for block in (self.block1, self.block2, self.block3, self.block4):
            for layer in block:
                if isinstance(layer, CenterPivotConv4d):
                    x = layer.forward_reference(x)
                elif isinstance(layer, nn.GroupNorm):
                    x = nn.functional.group_norm(x.contiguous(), layer.num_groups, layer.weight, layer.bias, layer.eps)
                else:
                    x = layer(x)
        return self.mlp(x.view(*x.shape[:2], -1).mean(-1))

    @property
    def first_stride(self) -> int:
        """Stride of block1's 4D conv: the slices it reads are taken at this step."""
        return self.block1[0].stride

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(x)))
        pooled = x.mean(dim=tuple(range(2, x.dim())), dtype=torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # the small head stays fp32 in bf16 mode
            return self.mlp(pooled)


def _probability(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)[:, 1]


_MAGIC = b"CVRF"
_VERSION = 1
_HEADER = struct.Struct("<4sBB")
_SHAPE = struct.Struct("<III")


@dataclass(frozen=True)
class RerankFeatures:
    """Per-image rerank input: the three pyramid levels, conv'd and unit-normalised per position.

    ``levels[s]`` is a float32 array (256, h_s, w_s) for area scale ``PYRAMID_SCALES[s]``; the
    last level has the size of the stage-3 feature map.
    """

    levels: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if len(self.levels) != len(PYRAMID_SCALES):
            raise ValueError(f"RerankFeatures needs {len(PYRAMID_SCALES)} levels, got {len(self.levels)}")
        for s, level in enumerate(self.levels):
            if not isinstance(level, np.ndarray) or level.dtype != np.float32 or level.ndim != 3:
                raise ValueError(f"RerankFeatures level {s} must be a 3-D float32 numpy array")
            if level.shape[0] != LEVEL_CHANNELS:
                raise ValueError(f"RerankFeatures level {s} has {level.shape[0]} channels, expected {LEVEL_CHANNELS}")
            if not np.isfinite(level).all():
                raise ValueError(f"RerankFeatures level {s} has non-finite values")
        expected = pyramid_sizes(*self.size)
        got = [tuple(level.shape[1:]) for level in self.levels]
        if got != expected:
            raise ValueError(f"RerankFeatures level sizes {got} do not form a pyramid; expected {expected}")

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the stage-3 feature map (the full-resolution level)."""
        return tuple(self.levels[-1].shape[1:])

    def to_bytes(self) -> bytes:
        """Header (magic, version, level count, shapes) + raw little-endian float32 levels."""
        parts = [_HEADER.pack(_MAGIC, _VERSION, len(self.levels))]
        parts += [_SHAPE.pack(*level.shape) for level in self.levels]
        parts += [np.ascontiguousarray(level, dtype="<f4").tobytes() for level in self.levels]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> RerankFeatures:
        """Inverse of :meth:`to_bytes`; raises ValueError naming what is wrong."""
        if len(data) < _HEADER.size:
            raise ValueError(f"RerankFeatures bytes too short for a header: {len(data)} bytes")
        magic, version, count = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"not RerankFeatures bytes: magic {magic!r}, version {version}")
        offset = _HEADER.size
        if len(data) < offset + count * _SHAPE.size:
            raise ValueError(f"RerankFeatures bytes truncated in the shape table ({len(data)} bytes)")
        shapes = [_SHAPE.unpack_from(data, offset + i * _SHAPE.size) for i in range(count)]
        offset += count * _SHAPE.size
        expected = offset + 4 * sum(int(np.prod(shape)) for shape in shapes)
        if len(data) != expected:
            raise ValueError(f"RerankFeatures bytes have length {len(data)}, shapes {shapes} need {expected}")
        levels = []
        for shape in shapes:
            n = int(np.prod(shape))
            levels.append(np.frombuffer(data, dtype="<f4", count=n, offset=offset).astype(np.float32).reshape(shape))
            offset += 4 * n
        return cls(tuple(levels))


@torch.no_grad()
def compute_rerank_features(feature_map: torch.Tensor, conv2ds: nn.ModuleList) -> RerankFeatures:
    """Per-image rerank features of a (1024, h, w) float32 pre-ReLU stage-3 map."""
    if feature_map.dim() != 3 or feature_map.shape[0] != FEATURE_CHANNELS:
        raise ValueError(f"feature_map must be ({FEATURE_CHANNELS}, h, w), got {tuple(feature_map.shape)}")
    h, w = feature_map.shape[1:]
    if min(min(size) for size in pyramid_sizes(h, w)) < 1:
        raise ValueError(f"feature_map {h}x{w} is too small for the rerank pyramid: needs at least 2x2 (images of 17x17 px)")
    if not torch.isfinite(feature_map).all():
        raise ValueError("feature_map has non-finite values")
    with precision_context(feature_map.device, "fp32"):
        levels = pyramid_levels(feature_map.unsqueeze(0).float(), conv2ds)
    return RerankFeatures(tuple(level[0].cpu().numpy() for level in levels))


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _stacked_levels(features: Sequence[RerankFeatures], device: torch.device) -> list[torch.Tensor]:
    """Per pyramid level, a (B, 256, h_s, w_s) tensor of features that share one size."""
    return [torch.stack([torch.from_numpy(f.levels[s]) for f in features]).to(device) for s in range(len(PYRAMID_SCALES))]


@torch.no_grad()
def match_probability(
    cv_learner: CVLearner,
    query: RerankFeatures,
    keys: Sequence[RerankFeatures],
    batch_size: int | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Match probability (K,) float32 of one query against K candidates of any sizes.

    Candidates of equal size run together in batches of ``batch_size`` (default: as many as
    keep a batch under ``MAX_BATCH_POSITIONS`` 4D correlation positions, which bounds memory).
    ``precision="bf16"`` is an approximate opt-in mode (autocast); the default fp32 is exact.
    """
    return _one_against_many(cv_learner, query, keys, batch_size, precision, one_is_query=True)


@torch.no_grad()
def key_major_probability(
    cv_learner: CVLearner,
    key: RerankFeatures,
    queries: Sequence[RerankFeatures],
    precision: str = "fp32",
    batch_size: int | None = None,
) -> np.ndarray:
    """Match probability (Q,) float32 of Q queries of any sizes against ONE candidate ``key``
    (candidate-major re-ranking): ``match_probability(cv_learner, query, [key])`` per query,
    batched over the queries as :func:`match_probability` batches its candidates."""
    return _one_against_many(cv_learner, key, queries, batch_size, precision, one_is_query=False)


def _one_against_many(cv_learner: CVLearner, one: RerankFeatures, many: Sequence[RerankFeatures],
                      batch_size: int | None, precision: str, one_is_query: bool) -> np.ndarray:
    """Probabilities of the pairs (``one``, ``many[i]``), ``one`` the query or the key; ``many``
    grouped by size and batched. ``correlation_slices`` always takes ``one`` as its single side;
    with ``one`` the key, its two slices are swapped back (:func:`_swapped`)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(cv_learner)
    stride = cv_learner.first_stride
    scores = np.empty(len(many), dtype=np.float32)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, other in enumerate(many):
        by_size[other.size].append(index)
    with precision_context(device, precision):
        one_levels = _stacked_levels([one], device)
        for (h, w), indices in by_size.items():
            step = batch_size or max(1, MAX_BATCH_POSITIONS // (one.size[0] * one.size[1] * h * w))
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                one_sub, many_sub = correlation_slices(one_levels, _stacked_levels([many[i] for i in chunk], device),
                                                       stride)
                key_sub, query_sub = (one_sub, many_sub) if one_is_query else (_swapped(many_sub), _swapped(one_sub))
                scores[chunk] = _probability(cv_learner.forward_slices(key_sub, query_sub)).cpu().numpy()
    return scores


def _swapped(sub: torch.Tensor) -> torch.Tensor:
    """A correlation slice computed with the query and key sides swapped, in the unswapped
    layout: the correlation is symmetric, so (B, 9, h, w, h', w') -> (B, 9, h', w', h, w) with
    level pair (i, j) -> (j, i)."""
    s = len(PYRAMID_SCALES)
    transpose = torch.tensor([(c % s) * s + c // s for c in range(s * s)], device=sub.device)
    return sub.permute(0, 1, 4, 5, 2, 3).index_select(1, transpose)


@torch.no_grad()
def match_probability_reference(
    cv_learner: CVLearner, conv2ds: nn.ModuleList, query_map: torch.Tensor, key_map: torch.Tensor
) -> float:
    """Reference-structured match probability of one pair of (1024, h, w) maps: the pyramid per
    pair, the full 4D correlation, the learner layer by layer as the reference code runs it.
    Slow; the oracle for tests and bench (a)."""
    corr = correlation_4d(query_map.float(), key_map.float(), conv2ds)
    return float(_probability(cv_learner.forward_reference(corr.unsqueeze(0)))[0])

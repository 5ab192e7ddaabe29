"""Exact tiled inner-product top-k with per-query exclusions, and merges of partial results.

The one exact search of the project (hard-negative mining, the re-ranking's global search).
Queries x gallery run in tiles: a torch matmul per (query tile, gallery tile), the excluded
pairs (same landmark, the query's own image) set to -inf inside the tile, a top-k per tile, and
a running top-k merged across gallery tiles. Partial results over gallery blocks, from any source
(other actors, "old rows" vs "new rows" of an incremental re-mine), combine with :func:`merge`
into exactly the one-pass result.

Order: score descending, equal scores by image id ascending (Python ``str`` order, i.e. by code
point). A score is the float64 inner product rounded to float32, so that results do not depend on
the tiling, the sharding, the device or the BLAS (two fp32 GEMM kernels round a product
differently in the last bit, which swaps near-equal neighbours): the tiles run in ``precision``
(``fp32`` default: IEEE fp32, TF32 off) and carry ``k + margin`` candidates, and these are
re-scored in float64 at the end; rows where more candidates than that lie within the fp32 error
bound of the k-th are searched again with a wider margin. ``fp16`` / ``bf16`` tiles choose the
candidates in half precision (an approximate mode: measure it with :func:`recall_at_k` against an
fp32 search).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MEMORY_BUDGET = 512 << 20  # bytes of working memory per search call (tiles, not inputs)
MARGIN = 8  # candidates carried beyond k in the tile precision, for the exact re-score
QUERY_TILE = 1024
MAX_GALLERY_TILE = 8192
_NONE = np.int64(np.iinfo(np.int64).min)  # sort key of an excluded or missing candidate
_LOW_MASK = (1 << 32) - 1  # low half of a key: the complement of the gallery item's id rank
_SIGN_FLIP = 0x7FFFFFFF  # makes negative float32 bit patterns sort as signed integers


@dataclass(frozen=True)
class Descriptors:
    """L2-normalised descriptors with their image ids and (optional) landmark ids.

    ``vectors``: (n, d) float32, numpy or torch (any device). ``ids``: n unique strings.
    ``landmarks``: n ints, negative or ``None`` for an image without a landmark; ``None`` for all.
    """

    vectors: np.ndarray | torch.Tensor
    ids: Sequence[str] | np.ndarray
    landmarks: Sequence[int | None] | np.ndarray | None = None


@dataclass(frozen=True)
class TopK:
    """Best gallery items per query, best first: ``ids`` (Q, k) str padded with ``''``,
    ``scores`` (Q, k) float32 padded with ``-inf``; ``pairs`` counts the inner products computed."""

    query_ids: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    pairs: int = 0

    @property
    def k(self) -> int:
        return self.ids.shape[1]


class Tiles(NamedTuple):
    queries: int
    gallery: int


def search(queries: Descriptors, gallery: Descriptors, k: int, *, precision: str = "fp32",
           tiles: Tiles | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
           exclude_self: bool = True, margin: int = MARGIN, device: str | torch.device | None = None) -> TopK:
    """Exact top-``k`` gallery items by inner product for every query.

    Excluded: gallery items with the query's landmark (when both sides have landmarks) and, with
    ``exclude_self``, the gallery item with the query's image id. Runs on ``device`` (default:
    the gallery's device), tiled by ``tiles`` or by :func:`plan_tiles` within ``memory_budget``;
    ``margin`` more candidates than ``k`` are kept per tile and re-scored exactly (module docstring).
    ``fp16`` / ``bf16`` also hold a half-precision copy of the gallery (half its fp32 size).
    """
    if k < 1:
        raise ValueError(f"k: {k} must be at least 1")
    if margin < 0:
        raise ValueError(f"margin: {margin} must not be negative")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    device = torch.device(device) if device is not None else _device_of(gallery.vectors)
    q = _as_matrix(queries.vectors, "queries.vectors", device)
    g = _as_matrix(gallery.vectors, "gallery.vectors", device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries.vectors have dim {q.shape[1]} but gallery.vectors have dim {g.shape[1]}")
    exclusions = _Exclusions(queries, gallery, exclude_self)
    for name, ids, vectors in (("queries", exclusions.query_ids, q), ("gallery", exclusions.gallery_ids, g)):
        if len(ids) != len(vectors):
            raise ValueError(f"{name}.ids: {len(ids)} ids for {len(vectors)} vectors")
    tiles = tiles or plan_tiles(q.shape[0], g.shape[0], q.shape[1], k + margin, memory_budget, precision,
                                exclusions.largest_class)
    ranks = torch.from_numpy(exclusions.gallery_rank).to(device)
    width, dtype, exact_tiles = k + margin, PRECISIONS[precision], precision == "fp32"
    keys, index = _search_tiles(q, g, width, dtype, tiles, exclusions, ranks)
    keys, index, unsure = _rescore(q, g, keys, index, ranks, k, exact_tiles)
    while unsure.any():  # more candidates within the fp32 bound than the margin held: widen it for those rows
        rows, width = torch.nonzero(unsure).flatten(), min(4 * width, g.shape[0])
        again = exclusions.of_queries(rows.cpu().numpy())
        wide = _search_tiles(q[rows], g, width, dtype, plan_tiles(
            len(rows), g.shape[0], q.shape[1], width, memory_budget, precision, again.largest_class), again, ranks)
        keys[rows], index[rows], unsure[rows] = _rescore(q[rows], g, *wide, ranks, k, exact_tiles)
    scores, index, found = _decode(keys).cpu().numpy(), index.cpu().numpy(), (keys != _NONE).cpu().numpy()
    ids = np.where(found, exclusions.gallery_ids[np.where(found, index, 0)] if len(g) else "", "")
    return TopK(exclusions.query_ids, ids.astype(str), np.where(found, scores, -np.inf).astype(np.float32),
                pairs=q.shape[0] * g.shape[0])


def _search_tiles(q: torch.Tensor, g: torch.Tensor, k: int, dtype: torch.dtype, tiles: Tiles,
                  exclusions: _Exclusions, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort keys and gallery rows (Q, k) of the best k in the tile precision: tile by tile, merged
    as they come."""
    device = g.device
    keys = torch.full((q.shape[0], k), int(_NONE), dtype=torch.int64, device=device)
    index = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=device)
    size = min(tiles.queries, q.shape[0]) * min(tiles.gallery, g.shape[0])
    out = torch.empty(size, device=device)  # reused by every tile: no fresh pages to fault in
    low = torch.empty(size, dtype=dtype, device=device) if dtype != torch.float32 else None
    g_tiles = g.to(dtype)  # a half-precision copy converted once, not once per query tile
    with torch.inference_mode(), _exact_fp32_matmul():
        for q0, q1 in _spans(q.shape[0], tiles.queries):
            query_tile = q[q0:q1].to(dtype)
            for g0, g1 in _spans(g.shape[0], tiles.gallery):
                scores = out[: (q1 - q0) * (g1 - g0)].view(q1 - q0, g1 - g0)
                if low is None:
                    torch.matmul(query_tile, g[g0:g1].T, out=scores)
                else:
                    scores.copy_(torch.matmul(query_tile, g_tiles[g0:g1].T, out=low[: scores.numel()].view_as(scores)))
                excluded = exclusions.in_tile(q0, q1, g0, g1)
                if excluded.size:
                    scores.view(-1).index_fill_(0, torch.from_numpy(excluded).to(device), float("-inf"))
                tile_keys, tile_index = _tile_topk(scores, ranks[g0:g1], k)
                keys[q0:q1], index[q0:q1] = _best(torch.cat([keys[q0:q1], tile_keys], 1),
                                                  torch.cat([index[q0:q1], tile_index + g0], 1), k)
    return keys, index


def _rescore(q: torch.Tensor, g: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, ranks: torch.Tensor,
             k: int, exact_tiles: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best ``k`` of the candidates by their float64 inner products rounded to float32, and
    the rows (Q,) bool where that may not be the exact top ``k`` of the whole gallery.

    After fp32 tiles only the candidates that can reach the top ``k`` are re-scored: the first
    ``k``, and any other whose tile score is within the fp32 GEMM's error bound of the lowest
    bound of those (:func:`_fp32_error`); the others provably stay out. A row whose last carried
    candidate is still within the bound is unsure: a candidate beyond the margin might be too
    (:func:`search` searches those rows again with a wider margin).
    After half-precision tiles every candidate is re-scored and no row is flagged."""
    unsure = torch.zeros(q.shape[0], dtype=torch.bool, device=g.device)
    if g.shape[0] == 0:
        return keys[:, :k], index[:, :k], unsure
    rows = index.clamp(min=0)
    found = keys != _NONE
    need = found.clone()
    if exact_tiles and keys.shape[1] > k:
        tile = _decode(keys)
        error = _fp32_error(q.shape[1], q.norm(dim=1)[:, None] * _norms_of(g, rows))
        floor = torch.where(found[:, :k], tile[:, :k] - error[:, :k], float("inf")).amin(dim=1, keepdim=True)
        need[:, k:] &= tile[:, k:] + error[:, k:] >= floor
        unsure = need[:, -1] & (keys.shape[1] < g.shape[0])  # a carried whole gallery leaves nothing out
    scores = torch.full(index.shape, float("-inf"), device=g.device)
    step = max(1, (16 << 20) // max(1, k * q.shape[1] * 8))  # 16 MiB of gathered rows
    for r0, r1 in _spans(q.shape[0], step):  # the first k columns, dense
        scores[r0:r1, :k] = torch.einsum("qd,qcd->qc", q[r0:r1].double(), g[rows[r0:r1, :k]].double()).float()
    extra_r, extra_c = torch.nonzero(need[:, k:], as_tuple=True)
    for p0, p1 in _spans(len(extra_r), step * k):  # the few others that may still enter
        r, c = extra_r[p0:p1], extra_c[p0:p1] + k
        scores[r, c] = (q[r].double() * g[rows[r, c]].double()).sum(dim=1).float()
    scores.masked_fill_(~need, float("-inf"))
    return (*_best(_encode(scores, ranks[rows]), index, k), unsure)


def _norms_of(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """|g| of the gallery rows ``rows`` (any shape), each distinct row once: few queries against a
    large gallery touch only their candidates, not every gallery row."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    norms = g.new_empty(len(unique))
    for u0, u1 in _spans(len(unique), 4096):
        norms[u0:u1] = g[unique[u0:u1]].norm(dim=1)
    return norms[inverse]


def _fp32_error(dim: int, norms: torch.Tensor) -> torch.Tensor:
    """Twice a bound on |fp32 inner product - exact| for vectors of these norm products: any
    summation order errs by at most gamma_d |q| |g| (Higham, Thm 3.1), plus the final rounding."""
    unit = 2.0 ** -24
    return 2 * (dim + 1) * unit / (1 - (dim + 1) * unit) * norms


def merge(*parts: TopK, k: int | None = None) -> TopK:
    """The top-``k`` (default: the smallest part's k) of partial results for the same queries
    over disjoint gallery blocks: equal to one search over the union of the blocks."""
    if not parts:
        raise ValueError("merge: needs at least one TopK")
    first = parts[0]
    for number, part in enumerate(parts[1:], 2):
        if not np.array_equal(part.query_ids, first.query_ids):
            raise ValueError(f"merge: part {number} has other query_ids than part 1")
    smallest = min(part.k for part in parts)
    k = smallest if k is None else k
    if not 1 <= k <= smallest:
        raise ValueError(f"k: {k} must be between 1 and the smallest part's k ({smallest})")
    ids = np.concatenate([part.ids for part in parts], axis=1)
    scores = np.concatenate([part.scores for part in parts], axis=1)
    _check_no_repeats(first.query_ids, ids)
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    order = np.lexsort((ids.ravel(), -scores.ravel(), rows)).reshape(ids.shape) % ids.shape[1]
    best = order[:, :k]
    return TopK(first.query_ids, np.take_along_axis(ids, best, 1), np.take_along_axis(scores, best, 1),
                pairs=sum(part.pairs for part in parts))


def recall_at_k(approximate: TopK, exact: TopK, k: int | None = None) -> float:
    """Share of the exact top-``k`` ids (padding aside) that the approximate top-``k`` also holds."""
    if not np.array_equal(approximate.query_ids, exact.query_ids):
        raise ValueError("recall_at_k: the two results have other query_ids")
    k = min(approximate.k, exact.k) if k is None else k
    truth, found = exact.ids[:, :k], approximate.ids[:, :k]
    wanted = truth != ""
    hits = (truth[:, :, None] == found[:, None, :]).any(axis=2) & wanted
    return float(hits.sum() / wanted.sum()) if wanted.any() else 1.0


def plan_tiles(n_queries: int, n_gallery: int, dim: int, k: int, memory_budget: int = DEFAULT_MEMORY_BUDGET,
               precision: str = "fp32", largest_class: int = 0) -> Tiles:
    """Tile sizes whose working set fits ``memory_budget`` bytes: a query tile of up to
    ``QUERY_TILE`` rows, then the largest gallery tile (up to ``MAX_GALLERY_TILE``) that fits."""
    tq, tg = max(1, min(n_queries, QUERY_TILE)), max(1, min(n_gallery, MAX_GALLERY_TILE))
    while tile_bytes(tq, tg, dim, k, precision, largest_class) > memory_budget and (tg > 256 or tq > 64):
        if tg > 256:
            tg //= 2
        else:
            tq //= 2
    return Tiles(tq, tg)


def tile_bytes(tq: int, tg: int, dim: int, k: int, precision: str = "fp32", largest_class: int = 0) -> int:
    """Working bytes of one tile step: the fp32 score tile (plus its half-precision original and
    the query tile's half-precision copy), the excluded-pair index, and the top-k buffers."""
    half = precision != "fp32"
    scores = tq * tg * (6 if half else 4)
    copies = tq * dim * 2 if half else 0
    excluded = tq * min(tg, largest_class + 1) * 8
    running = tq * (k + 1) * 8 * 6
    return scores + copies + excluded + running


def _tile_topk(scores: torch.Tensor, ranks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort keys and tile columns of the best ``k`` of each row (ties by rank, i.e. by id)."""
    if scores.shape[1] <= k:
        index = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    else:
        values, index = torch.topk(scores, k + 1, dim=1)
        tied = (values[:, k - 1] == values[:, k]) & (values[:, k - 1] > float("-inf"))
        index = index[:, :k].clone()
        if tied.any():  # the k-th place is shared: choose among the equal scores by id
            rows = tied.nonzero().squeeze(1)
            index[rows] = torch.topk(_encode(scores[rows], ranks.expand(len(rows), -1)), k, dim=1).indices
    return _encode(scores.gather(1, index), ranks[index]), index


def _best(keys: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.topk(keys, k, dim=1)
    return top.values, index.gather(1, top.indices)


def _encode(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort like (score descending, rank ascending); -inf becomes ``_NONE``."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ _SIGN_FLIP, bits)
    keys = (bits << 32) | (_LOW_MASK - ranks)
    return keys.masked_fill(scores == float("-inf"), int(_NONE))


def _decode(keys: torch.Tensor) -> torch.Tensor:
    """The float32 scores of :func:`_encode`'s keys (``_NONE`` decodes to a finite junk value)."""
    bits = keys >> 32
    return torch.where(bits < 0, bits ^ _SIGN_FLIP, bits).to(torch.int32).view(torch.float32)


class _Exclusions:
    """The skipped (query, gallery) pairs of one search, and the gallery's id ranks."""

    def __init__(self, queries: Descriptors, gallery: Descriptors, exclude_self: bool):
        self.query_ids, self.gallery_ids = _as_ids(queries.ids), _as_ids(gallery.ids)
        n = len(self.gallery_ids)
        _, codes = np.unique(np.concatenate([self.gallery_ids, self.query_ids]), return_inverse=True)
        self.gallery_rank = codes[:n].astype(np.int64)  # ascending with the id
        if len(np.unique(self.gallery_rank)) != n:
            values, counts = np.unique(self.gallery_ids, return_counts=True)
            raise ValueError(f"gallery.ids: {str(values[counts > 1][0])!r} appears more than once")
        position = np.full(len(codes) + 1, -1, dtype=np.int64)
        position[self.gallery_rank] = np.arange(n)
        self.self_position = position[codes[n:]] if exclude_self else np.full(len(self.query_ids), -1)
        self.query_class = np.full(len(self.query_ids), -1, dtype=np.int64)
        self.members = np.zeros(0, dtype=np.int64)  # sorted class * n + gallery index
        self.largest_class = 0
        if queries.landmarks is not None and gallery.landmarks is not None:
            query_lm = _as_landmarks(queries.landmarks, "queries.landmarks")
            gallery_lm = _as_landmarks(gallery.landmarks, "gallery.landmarks")
            if len(query_lm) != len(self.query_ids) or len(gallery_lm) != n:
                raise ValueError("queries/gallery: need one landmark per id")
            has = gallery_lm >= 0
            classes, gallery_class = np.unique(gallery_lm[has], return_inverse=True)
            if len(classes):
                self.members = np.sort(gallery_class * n + np.flatnonzero(has))
                self.largest_class = int(np.bincount(gallery_class).max())
                at = np.minimum(np.searchsorted(classes, query_lm), len(classes) - 1)
                self.query_class = np.where((query_lm >= 0) & (classes[at] == query_lm), at, -1)

    def of_queries(self, rows: np.ndarray) -> _Exclusions:
        """The same exclusions for the queries at positions ``rows`` only."""
        part = copy.copy(self)
        part.query_ids, part.self_position, part.query_class = (
            self.query_ids[rows], self.self_position[rows], self.query_class[rows])
        return part

    def in_tile(self, q0: int, q1: int, g0: int, g1: int) -> np.ndarray:
        """Flat indices (row * width + column) of the excluded pairs in a tile."""
        n, width = len(self.gallery_ids), g1 - g0
        cls = self.query_class[q0:q1]
        rows = np.flatnonzero(cls >= 0)
        lo = np.searchsorted(self.members, cls[rows] * n + g0)
        hi = np.searchsorted(self.members, cls[rows] * n + g1)
        counts = hi - lo
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        columns = self.members[starts] % n - g0
        own = self.self_position[q0:q1]
        mine = np.flatnonzero((own >= g0) & (own < g1))
        return np.concatenate([np.repeat(rows, counts) * width + columns, mine * width + own[mine] - g0])


def _check_no_repeats(query_ids: np.ndarray, ids: np.ndarray) -> None:
    ordered = np.sort(ids, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != "")
    if repeated.any():
        row, column = np.argwhere(repeated)[0]
        raise ValueError(f"merge: query {str(query_ids[row])!r} has gallery item {str(ordered[row, column])!r} "
                         "in more than one part (the gallery blocks must be disjoint)")


def _as_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=str).reshape(-1)


def _as_landmarks(landmarks: Sequence[int | None] | np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(landmarks)
    if values.dtype == object:
        values = np.array([-1 if v is None else v for v in values.ravel()])
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name}: expected integer landmark ids (negative or None for none), got {values.dtype}")
    return np.where(values < 0, -1, values).astype(np.int64).reshape(-1)


def _as_matrix(x: np.ndarray | torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """A float32 tensor on ``device``, sharing the memory of a float32 array (read-only ones too:
    an object-store array is read, never written)."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, dim) array, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(t.sum())):  # one pass; NaN and inf propagate (unit rows cannot overflow)
        raise ValueError(f"{name}: holds NaN or infinite values")
    return t


def _device_of(x: np.ndarray | torch.Tensor) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    return ((start, min(start + size, n)) for start in range(0, n, size))


@contextmanager
def _exact_fp32_matmul() -> Iterator[None]:
    """IEEE fp32 matmul for the duration (no TF32 on CUDA, no bf16 passes in oneDNN)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)

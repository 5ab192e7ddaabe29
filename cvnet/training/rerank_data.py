"""Stage-2 batches: the step's pairs with one augmented view of each image in them, made in
loader workers (:func:`cvnet.training.data.prefetch_batches`); the consumer turns the views into
stage-3 maps with the frozen backbone (:func:`pair_maps`), on the fly or through a
:class:`MapCache`.

With ``views`` > 0 (the cache's setting) an image has ``views`` fixed augmented views: view ``v``
of image ``i`` is drawn from the seed ``(seed, i, v)`` alone, and a step picks one view per
image. A view's map is then the same at every step it is drawn, so a :class:`MapCache` computes
it once per worker and reuses it; a resumed worker recomputes it to the same values, so batches
stay a pure function of ``(seed, step)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cvnet.training.curriculum import Curriculum
from cvnet.training.data import BatchLoader
from cvnet.training.pairs import PairBatch, PairSampler
from cvnet.training.rerank_step import MapBatch, stage3_maps


@dataclass(frozen=True)
class RerankImages:
    """One worker's stage-2 batch of ``step``: ``images`` (N, 3, S, S), one view per distinct
    anchor image, then one per distinct key image (an image that is both gets two views);
    ``query_pos`` (A,) and ``key_pos`` (P,) index it; ``has_prob`` is the curriculum's
    Hide-and-Seek probability at ``step``; ``view_keys`` (N, 2) the (image index, view) of each
    row when the views are fixed (else None)."""

    step: int
    images: torch.Tensor
    query_pos: np.ndarray
    key_pos: np.ndarray
    pairs: PairBatch
    has_prob: float
    bad_inputs: dict[int, dict[str, str]]
    view_keys: np.ndarray | None = None


@dataclass(frozen=True)
class RerankBatches:
    """The stage-2 batch of a step for one worker, a pure function of ``(seed, step, rank)``
    (the sampler's seed draws the pairs, ``seed`` the augmentation); picklable. ``views`` > 0:
    each image's view is one of its ``views`` fixed views (see the module docstring)."""

    sampler: PairSampler
    loader: BatchLoader
    curriculum: Curriculum
    batch_size: int
    rank: int
    world_size: int
    seed: int
    views: int = 0

    def __call__(self, step: int) -> RerankImages:
        point = self.curriculum(step)
        pairs = self.sampler.worker_pairs(step, self.batch_size, self.rank, self.world_size,
                                          point.hard_share)
        queries, query_pos = np.unique(pairs.anchors, return_inverse=True)
        keys, key_pos = np.unique(pairs.keys, return_inverse=True)
        images = np.concatenate([queries, keys])  # a key never shares its query's view
        rng = np.random.default_rng([self.seed, step, self.rank])
        view_keys = None
        if self.views:
            view_keys = np.stack([images, self._fixed_views(queries, keys, rng)], axis=1)
            views = torch.cat([self.loader.views(np.array([i]), np.random.default_rng([self.seed, i, v]), 1)[0]
                               for i, v in view_keys.tolist()])
        else:
            (views,) = self.loader.views(images, rng, 1)
        return RerankImages(step, views, query_pos, len(queries) + key_pos, pairs,
                            point.has_prob, self.loader.new_bad_inputs(), view_keys)

    def _fixed_views(self, queries: np.ndarray, keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The view of each query, then of each key; a key that is also a query (a self positive)
        gets another of its views than the query's (with ``views`` > 1)."""
        query_views = rng.integers(0, self.views, len(queries))
        key_views = rng.integers(0, self.views, len(keys))
        also = np.isin(keys, queries)
        if also.any() and self.views > 1:
            own = query_views[np.searchsorted(queries, keys[also])]
            key_views[also] = (own + 1 + rng.integers(0, self.views - 1, int(also.sum()))) % self.views
        return np.concatenate([query_views, key_views])


class MapCache:
    """Stage-3 maps of fixed views (:attr:`RerankImages.view_keys`), kept per worker in CPU
    memory as float16 (about 0.5 MB a 1024x16x16 map). A map is computed alone (batched convs
    differ in the last bits with the batch) and every map returned went through float16, so a
    hit equals a miss and a restarted worker recomputes the same maps."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._maps)

    def maps(self, backbone: nn.Module, batch: RerankImages, device: torch.device | str,
             precision: str = "fp32") -> torch.Tensor:
        """The float32 maps of ``batch.images`` on ``device``, computing only the views not seen yet."""
        if batch.view_keys is None:
            raise ValueError("MapCache: the batch has no fixed views (set map_cache.views > 0)")
        keys = [tuple(k) for k in batch.view_keys.tolist()]
        missing = [row for row, key in enumerate(keys) if key not in self._maps]
        for row in missing:  # one image at a time: a map must not depend on its batch-mates
            image = batch.images[row:row + 1].to(device)
            self._maps[keys[row]] = stage3_maps(backbone, image, precision)[0].half().cpu()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self._maps[key] for key in keys]).to(device).float()


def pair_maps(backbone: nn.Module, batch: RerankImages, device: torch.device | str,
              precision: str = "fp32", cache: MapCache | None = None) -> MapBatch:
    """The batch's stage-3 maps (frozen ``backbone``, no grad; through ``cache`` when given)
    arranged as a :class:`MapBatch`."""
    if cache is None:
        maps = stage3_maps(backbone, batch.images.to(device), precision)
    else:
        maps = cache.maps(backbone, batch, device, precision)
    return MapBatch(maps[torch.from_numpy(batch.query_pos).to(maps.device)],
                    maps[torch.from_numpy(batch.key_pos).to(maps.device)],
                    torch.from_numpy(batch.pairs.query_of),
                    torch.from_numpy(batch.pairs.labels).to(maps.device))

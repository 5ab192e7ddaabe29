"""Stage-2 batches: the step's pairs with one augmented view of each image in them, made in
loader workers (:func:`cvnet.training.data.prefetch_batches`); the consumer turns the views into
stage-3 maps with the frozen backbone (:func:`pair_maps`).
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
    image of the pairs; ``query_pos`` (A,) and ``key_pos`` (P,) index it; ``has_prob`` is the
    curriculum's Hide-and-Seek probability at ``step``."""

    step: int
    images: torch.Tensor
    query_pos: np.ndarray
    key_pos: np.ndarray
    pairs: PairBatch
    has_prob: float
    bad_inputs: dict[int, dict[str, str]]


@dataclass(frozen=True)
class RerankBatches:
    """The stage-2 batch of a step for one worker, a pure function of ``(seed, step, rank)``
    (the sampler's seed draws the pairs, ``seed`` the augmentation); picklable."""

    sampler: PairSampler
    loader: BatchLoader
    curriculum: Curriculum
    batch_size: int
    rank: int
    world_size: int
    seed: int

    def __call__(self, step: int) -> RerankImages:
        point = self.curriculum(step)
        pairs = self.sampler.worker_pairs(step, self.batch_size, self.rank, self.world_size,
                                          point.hard_share)
        images, positions = np.unique(np.concatenate([pairs.anchors, pairs.keys]), return_inverse=True)
        rng = np.random.default_rng([self.seed, step, self.rank])
        (views,) = self.loader.views(images, rng, 1)
        split = len(pairs.anchors)
        return RerankImages(step, views, positions[:split], positions[split:], pairs,
                            point.has_prob, self.loader.new_bad_inputs())


def pair_maps(backbone: nn.Module, batch: RerankImages, device: torch.device | str,
              precision: str = "fp32") -> MapBatch:
    """The batch's stage-3 maps (frozen ``backbone``, no grad) arranged as a :class:`MapBatch`."""
    maps = stage3_maps(backbone, batch.images.to(device), precision)
    return MapBatch(maps[torch.from_numpy(batch.query_pos).to(maps.device)],
                    maps[torch.from_numpy(batch.key_pos).to(maps.device)],
                    torch.from_numpy(batch.pairs.query_of),
                    torch.from_numpy(batch.pairs.labels).to(maps.device))

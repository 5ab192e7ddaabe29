"""Stage-2 pair sampling: anchors, one positive each, and hard (mined) or easy (random) negatives.

A step's pairs are a pure function of ``(seed, step, hard_share)``, and ``hard_share`` comes from
the curriculum at that step, so a resumed run continues the same order. As in stage 1
(:func:`cvnet.training.data.global_batch`), every worker computes the whole global batch and
keeps its own anchors' pairs, so all DDP ranks run the same number of steps.

- **Anchors** are drawn by :func:`~cvnet.training.data.global_batch` (``uniform`` epochs or
  ``balanced`` by landmark) over the images whose landmark has at least two images. An image
  alone in its landmark has no positive, so it is never an anchor; it still serves as a
  negative of other landmarks (easy, or hard when the mining lists it).
- **Positive**: another image of the anchor's landmark, uniformly; or, with probability
  ``self_positives``, the anchor image itself (the batch gives it another augmented view, so the
  pair is two crops of one scene: correspondences the re-ranker can always find; ours).
- **Negatives**: ``negatives_per_anchor`` per anchor. Of the global batch's negative slots,
  ``hard_share`` are hard, rounded stochastically (floor plus one with the fractional part's
  probability), so the expected share is exact at any batch size. A hard negative is drawn
  uniformly from the first ``top_k`` of the anchor's mined list; an anchor the table does not
  cover gets an easy one instead. An easy negative is uniform over the images of all other
  landmarks. ``PairBatch.hard`` records which negatives were hard.

Pairs are laid out anchor by anchor: (anchor, positive), then (anchor, negative) x n.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvnet.training.data import TrainDataError, TrainSet, global_batch

log = logging.getLogger(__name__)

HardNegatives = pa.Table | Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class PairBatch:
    """The pairs of one step, as image indices into the :class:`TrainSet`.

    ``anchors`` (A,); per pair (P = A * (1 + negatives_per_anchor)): ``keys`` (P,), ``query_of``
    (P,) the position of the pair's anchor in ``anchors``, ``labels`` (P,) int64 1 = same
    landmark, ``hard`` (P,) bool, True for a negative taken from the mined table.
    """

    anchors: np.ndarray
    keys: np.ndarray
    query_of: np.ndarray
    labels: np.ndarray
    hard: np.ndarray

    @property
    def pairs_per_anchor(self) -> int:
        return len(self.keys) // max(1, len(self.anchors))

    def anchor_slice(self, start: int, stop: int) -> PairBatch:
        """The pairs of anchors ``start:stop``; ``query_of`` renumbered from 0."""
        n = self.pairs_per_anchor
        rows = slice(start * n, stop * n)
        return PairBatch(self.anchors[start:stop], self.keys[rows], self.query_of[rows] - start,
                         self.labels[rows], self.hard[rows])


@dataclass(frozen=True)
class MinedNegatives:
    """Ranked mined negatives per training image, as CSR: image ``i``'s list is
    ``indices[offsets[i]:offsets[i + 1]]`` (train-set indices, best first)."""

    offsets: np.ndarray
    indices: np.ndarray

    def counts(self, images: np.ndarray, top_k: int) -> np.ndarray:
        """How many of each image's negatives the sampler may draw from (at most ``top_k``)."""
        return np.minimum(self.offsets[images + 1] - self.offsets[images], top_k)


def _as_table(hard_negatives: HardNegatives) -> pa.Table:
    if isinstance(hard_negatives, pa.Table):
        missing = {"image_id", "negative_ids"} - set(hard_negatives.column_names)
        if missing:
            raise TrainDataError(f"hard negatives: missing columns {sorted(missing)}")
        return hard_negatives
    ids = list(hard_negatives)
    return pa.table({"image_id": pa.array(ids, pa.string()),
                     "negative_ids": pa.array([list(hard_negatives[i]) for i in ids],
                                              pa.list_(pa.string()))})


def mined_negatives(hard_negatives: HardNegatives, train_set: TrainSet) -> MinedNegatives:
    """Map a hard-negatives table (``image_id``, ``negative_ids`` ranked best first; optional
    ``landmark_id``, ``negative_scores``) or a mapping ``{image_id: [negative ids]}`` onto the
    training set.

    Rows and negatives whose image is not in the training set are left out (the mining may
    have covered a larger collection) and counted in the log. Raises :class:`TrainDataError`
    for a repeated ``image_id``, a ``landmark_id`` that disagrees with the training set, a
    negative of the anchor's own landmark, or a table that covers no training image at all.
    """
    table = _as_table(hard_negatives)
    known = pa.array(train_set.image_ids, pa.string())
    ids = table["image_id"].combine_chunks().cast(pa.string())
    if pc.count_distinct(ids).as_py() != table.num_rows:
        counts = pc.value_counts(ids).to_pylist()
        repeated = next(c["values"] for c in counts if c["counts"] > 1)
        raise TrainDataError(f"hard negatives: image_id {repeated!r} appears more than once")
    rows = pc.index_in(ids, value_set=known).fill_null(-1).to_numpy().astype(np.int64)
    covered = np.flatnonzero(rows >= 0)
    if "landmark_id" in table.column_names:
        mined = table["landmark_id"].to_numpy()[covered]
        ours = train_set.landmark_ids[train_set.labels[rows[covered]]]
        bad = np.flatnonzero(mined != ours)
        if len(bad):
            raise TrainDataError(f"hard negatives: image {ids[int(covered[bad[0]])].as_py()!r} has "
                                 f"landmark_id {mined[bad[0]]} in the table but "
                                 f"{ours[bad[0]]} in the training set")
    lists = table["negative_ids"].combine_chunks()
    flat = pc.index_in(lists.flatten().cast(pa.string()), value_set=known)
    flat = flat.fill_null(-1).to_numpy().astype(np.int64)
    owner = np.repeat(rows, np.diff(lists.offsets.to_numpy()))
    keep = (flat >= 0) & (owner >= 0)
    if not keep.any():
        raise TrainDataError(f"hard negatives: none of the table's {table.num_rows} rows maps "
                             "an image and a negative of the training set")
    anchors, negatives = owner[keep], flat[keep]
    same = np.flatnonzero(train_set.labels[anchors] == train_set.labels[negatives])
    if len(same):
        a, n = anchors[same[0]], negatives[same[0]]
        raise TrainDataError(f"hard negatives: image {train_set.image_ids[a]!r} lists "
                             f"{train_set.image_ids[n]!r} of its own landmark "
                             f"{train_set.landmark_ids[train_set.labels[a]]}")
    dropped_rows, dropped = len(rows) - len(covered), int(((flat < 0) & (owner >= 0)).sum())
    if dropped_rows or dropped:
        log.warning("hard negatives: %d rows and %d negatives name images outside the training "
                    "set; left out", dropped_rows, dropped)
    order = np.argsort(anchors, kind="stable")  # keeps each list's ranking
    offsets = np.zeros(len(train_set) + 1, dtype=np.int64)
    np.cumsum(np.bincount(anchors, minlength=len(train_set)), out=offsets[1:])
    return MinedNegatives(offsets, negatives[order])


class PairSampler:
    """Draws the stage-2 pairs of a step from a :class:`TrainSet` (see the module docstring)."""

    def __init__(self, train_set: TrainSet, hard_negatives: HardNegatives | None = None,
                 negatives_per_anchor: int = 1, top_k: int = 10, sampling: str = "uniform",
                 seed: int = 0, self_positives: float = 0.0):
        if negatives_per_anchor < 1:
            raise ValueError(f"negatives_per_anchor: {negatives_per_anchor} must be >= 1")
        if not 0.0 <= self_positives <= 1.0:
            raise ValueError(f"self_positives: {self_positives} is outside [0, 1]")
        self.self_positives = self_positives
        if top_k < 1:
            raise ValueError(f"top_k: {top_k} must be >= 1")
        self.train_set, self.seed, self.sampling = train_set, seed, sampling
        self.negatives_per_anchor, self.top_k = negatives_per_anchor, top_k
        self.mined = None if hard_negatives is None else mined_negatives(hard_negatives, train_set)
        sizes = np.array([len(m) for m in train_set.members])
        self.singletons = int((sizes == 1).sum())
        eligible = np.flatnonzero(sizes[train_set.labels] >= 2)
        if len(eligible) == 0:
            raise TrainDataError("training set: no landmark has two images; stage 2 needs "
                                 "an anchor and a positive of the same landmark")
        landmarks, labels = np.unique(train_set.labels[eligible], return_inverse=True)
        self.anchor_pool = eligible
        self._anchor_set = TrainSet([train_set.image_ids[i] for i in eligible],
                                    [train_set.uris[i] for i in eligible],
                                    labels.astype(np.int64), train_set.landmark_ids[landmarks])
        self._order = np.concatenate(train_set.members)  # images grouped by landmark
        self._start = np.cumsum([0, *sizes[:-1]])
        self._size = sizes
        self._rank = np.empty(len(train_set), dtype=np.int64)  # position inside its landmark
        for members in train_set.members:
            self._rank[members] = np.arange(len(members))
        if self.singletons:
            log.info("pair sampler: %d landmark(s) with one image are negatives only, never "
                     "anchors", self.singletons)

    def global_pairs(self, step: int, anchors: int, hard_share: float) -> PairBatch:
        """All workers' pairs of ``step``: ``anchors`` anchors; deterministic."""
        if not 0.0 <= hard_share <= 1.0:
            raise ValueError(f"hard_share: {hard_share} is outside [0, 1]")
        ts, n_neg = self.train_set, self.negatives_per_anchor
        anchor = self.anchor_pool[global_batch(self._anchor_set, step, anchors, self.seed,
                                               self.sampling)]
        label = ts.labels[anchor]
        rng = np.random.default_rng([self.seed, step, 1])
        # positive: another member of the landmark (skip the anchor's own position)
        pick = rng.integers(0, self._size[label] - 1)
        pick += pick >= self._rank[anchor]
        positive = self._order[self._start[label] + pick]
        # easy negatives: uniform over the images outside the anchor's landmark
        slot_label = np.repeat(label, n_neg)
        pick = rng.integers(0, len(ts) - self._size[slot_label])
        pick += self._size[slot_label] * (pick >= self._start[slot_label])
        negative = self._order[pick]
        hard = np.zeros(len(slot_label), dtype=bool)
        exact = hard_share * len(hard)
        n_hard = int(exact) + int(rng.random() < exact - int(exact))
        hard[rng.permutation(len(hard))[:n_hard]] = True
        if self.mined is not None:
            slot_anchor = np.repeat(anchor, n_neg)
            counts = self.mined.counts(slot_anchor, self.top_k)
            pick = (rng.random(len(hard)) * counts).astype(np.int64)
            hard &= counts > 0
            negative[hard] = self.mined.indices[self.mined.offsets[slot_anchor[hard]] + pick[hard]]
        else:
            hard[:] = False
        if self.self_positives:  # drawn last: the other draws do not depend on it
            positive = np.where(rng.random(len(anchor)) < self.self_positives, anchor, positive)
        keys = np.concatenate([positive[:, None], negative.reshape(-1, n_neg)], axis=1)
        labels = np.zeros_like(keys)
        labels[:, 0] = 1
        hard_flags = np.concatenate([np.zeros((len(anchor), 1), bool), hard.reshape(-1, n_neg)], 1)
        return PairBatch(anchor, keys.ravel(), np.repeat(np.arange(len(anchor)), n_neg + 1),
                         labels.ravel(), hard_flags.ravel())

    def worker_pairs(self, step: int, batch_size: int, rank: int, world_size: int,
                     hard_share: float) -> PairBatch:
        """This worker's ``batch_size`` anchors of the global batch of ``step`` and their pairs."""
        batch = self.global_pairs(step, batch_size * world_size, hard_share)
        return batch.anchor_slice(rank * batch_size, (rank + 1) * batch_size)

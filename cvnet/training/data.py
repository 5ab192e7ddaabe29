"""Training data: a labelled image set, per-step sharded sampling, augmented batches, and a
prefetching loader that makes them in worker processes.

Sampling is a pure function of ``(seed, step)``: every worker computes the same global batch
and takes its own slice, so all DDP ranks run exactly the same number of steps (no short final
batch, no step-count deadlock) and a resumed run continues the sample order where it stopped.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cvnet.data.images import ImageDecodeError, decode_image, normalize
from cvnet.training.augment import training_view

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrainDataError(ValueError):
    """The training set is unusable; the message names the item and the reason."""


@dataclass
class TrainSet:
    """Images with landmark labels; ``labels`` are class indices into ``landmark_ids``."""

    image_ids: list[str]
    uris: list[str]
    labels: np.ndarray
    landmark_ids: np.ndarray
    members: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(len(self.landmark_ids) + 1))
        self.members = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def __len__(self) -> int:
        return len(self.uris)

    @property
    def num_classes(self) -> int:
        return len(self.landmark_ids)


def train_set_from_manifest(table: pa.Table, split: str | None = None) -> TrainSet:
    """A :class:`TrainSet` from an image manifest (``image_id, uri, landmark_id, split``)."""
    missing = {"image_id", "uri", "landmark_id"} - set(table.column_names)
    if missing:
        raise TrainDataError(f"manifest: missing columns {sorted(missing)}")
    if split is not None and "split" in table.column_names:
        table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise TrainDataError(f"manifest: no images in split {split!r}")
    unlabelled = table.filter(pc.is_null(table["landmark_id"]))
    if unlabelled.num_rows:
        raise TrainDataError(f"manifest: image {unlabelled['image_id'][0].as_py()!r} has no "
                             f"landmark_id ({unlabelled.num_rows} unlabelled images)")
    landmarks = table["landmark_id"].to_numpy()
    landmark_ids, labels = np.unique(landmarks, return_inverse=True)
    if len(landmark_ids) < 2:
        raise TrainDataError(f"manifest: {len(landmark_ids)} landmark(s); need at least 2")
    return TrainSet(table["image_id"].to_pylist(), table["uri"].to_pylist(),
                    labels.astype(np.int64), landmark_ids)


def load_train_set(root: str, split: str) -> TrainSet:
    """The labelled training images: a Parquet manifest or a GLDv2-format root."""
    from cvnet.data.gldv2 import gldv2_manifest
    from cvnet.data.manifest import read_manifest

    if not root:
        raise ValueError("data.root: empty; give a GLDv2 root or a manifest .parquet")
    if root.endswith(".parquet"):
        return train_set_from_manifest(read_manifest(root), split)
    return train_set_from_manifest(gldv2_manifest(root, split=split), split)


def global_batch(train_set: TrainSet, step: int, global_size: int, seed: int,
                 sampling: str) -> np.ndarray:
    """Image indices of the whole (all workers) batch of ``step``; deterministic.

    ``uniform``: epochs are seeded permutations walked in order (an epoch's tail shorter than
    a batch is skipped). ``balanced``: each slot draws a landmark uniformly, then an image of it.
    """
    if sampling == "balanced":
        rng = np.random.default_rng([seed, step])
        classes = rng.integers(0, train_set.num_classes, global_size)
        return np.array([rng.choice(train_set.members[c]) for c in classes], dtype=np.int64)
    if sampling != "uniform":
        raise ValueError(f"sampling: {sampling!r} is not 'uniform' or 'balanced'")
    steps_per_epoch = len(train_set) // global_size
    if steps_per_epoch == 0:
        raise TrainDataError(f"training set: {len(train_set)} images < one global batch "
                             f"of {global_size}")
    epoch, offset = divmod(step, steps_per_epoch)
    perm = _epoch_order(seed, epoch, len(train_set))
    return perm[offset * global_size:(offset + 1) * global_size]


@functools.lru_cache(maxsize=1)
def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The seeded image order of one epoch (read-only), drawn once per epoch, not per step."""
    order = np.random.default_rng([seed, epoch]).permutation(size)
    order.flags.writeable = False
    return order


def worker_indices(train_set: TrainSet, step: int, batch_size: int, rank: int, world_size: int,
                   seed: int, sampling: str) -> np.ndarray:
    """This worker's slice of the global batch of ``step``."""
    batch = global_batch(train_set, step, batch_size * world_size, seed, sampling)
    return batch[rank * batch_size:(rank + 1) * batch_size]


class BatchLoader:
    """Reads, decodes and augments a worker's batch into two views (query, momentum key).

    An image that cannot be read or decoded is recorded in ``bad_inputs`` (image id, uri,
    error) and replaced by another image of the same landmark; a landmark with no readable
    image left raises :class:`TrainDataError`.
    """

    def __init__(self, train_set: TrainSet, image_size: int, crop_scale: tuple[float, float],
                 flip: bool, read_bytes: Callable[[str], bytes], perspective: float = 0.0):
        self.train_set = train_set
        self.image_size, self.crop_scale, self.flip = image_size, crop_scale, flip
        self.perspective = perspective
        self.read_bytes = read_bytes
        self.bad_inputs: dict[int, dict[str, str]] = {}
        self._reported: set[int] = set()

    def _decode(self, index: int) -> np.ndarray:
        ts = self.train_set
        for candidate in [index, *ts.members[ts.labels[index]]]:
            if int(candidate) in self.bad_inputs:
                continue
            try:
                return decode_image(self.read_bytes(ts.uris[candidate]), ts.image_ids[candidate])
            except (ImageDecodeError, OSError) as err:
                self.bad_inputs[int(candidate)] = {"image_id": ts.image_ids[candidate],
                                                   "uri": ts.uris[candidate], "stage": "train",
                                                   "error": str(err)}
                log.warning("bad training image %s: %s", ts.image_ids[candidate], err)
        raise TrainDataError(f"landmark {ts.landmark_ids[ts.labels[index]]}: "
                             "no readable image left")

    def views(self, indices: np.ndarray, rng: np.random.Generator, count: int) -> list[torch.Tensor]:
        """``count`` augmented views of each image: ``count`` (B, 3, S, S) tensors; for each
        image in turn its views are drawn in order (the draws of ``rng`` depend on nothing else)."""
        out: list[list[np.ndarray]] = [[] for _ in range(count)]
        for index in indices:
            image = self._decode(int(index))
            for views in out:
                views.append(normalize(training_view(image, self.image_size, rng, self.crop_scale,
                                                     self.flip, self.perspective)))
        return [torch.from_numpy(np.stack(views)) for views in out]

    def load(self, indices: np.ndarray, rng: np.random.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query views, key views, class labels)`` as (B,3,S,S), (B,3,S,S), (B,) tensors."""
        queries, keys = self.views(indices, rng, 2)
        return queries, keys, torch.from_numpy(self.train_set.labels[indices])

    def new_bad_inputs(self) -> dict[int, dict[str, str]]:
        """The bad inputs recorded since the last call (a worker process sends them with its
        batch; the consumer merges them by image index, so none is lost or doubled)."""
        new = {i: row for i, row in self.bad_inputs.items() if i not in self._reported}
        self._reported.update(new)
        return new


@dataclass(frozen=True)
class Stage1Batch:
    """One worker's stage-1 batch of ``step`` and the bad inputs met while making it."""

    step: int
    queries: torch.Tensor
    keys: torch.Tensor
    labels: torch.Tensor
    bad_inputs: dict[int, dict[str, str]]


@dataclass(frozen=True)
class Stage1Batches:
    """The stage-1 batch of a step for one worker, a pure function of ``(seed, step, rank)``;
    picklable, so :func:`prefetch_batches` runs it in worker processes."""

    loader: BatchLoader
    batch_size: int
    rank: int
    world_size: int
    seed: int
    sampling: str

    def __call__(self, step: int) -> Stage1Batch:
        indices = worker_indices(self.loader.train_set, step, self.batch_size, self.rank,
                                 self.world_size, self.seed, self.sampling)
        rng = np.random.default_rng([self.seed, step, self.rank])
        queries, keys, labels = self.loader.load(indices, rng)
        return Stage1Batch(step, queries, keys, labels, self.loader.new_bad_inputs())


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is ``make_batch(step)``."""

    def __init__(self, make_batch: Callable[[int], T]):
        self.make_batch = make_batch

    def __getitem__(self, step: int) -> T:
        return self.make_batch(step)


def _as_is(batch: T) -> T:
    return batch


def prefetch_batches(make_batch: Callable[[int], T], start_step: int, stop_step: int,
                     num_workers: int = 2, prefetch_factor: int = 2,
                     context: str = "forkserver") -> Iterator[T]:
    """``make_batch(step)`` for ``step`` in ``[start_step, stop_step)``, in step order.

    ``num_workers`` processes (a torch ``DataLoader``) make up to ``prefetch_factor`` batches
    each ahead of the consumer; 0 makes each batch in this process when it is asked for (the
    synchronous baseline). Each batch depends only on its step, so the stream is the same for
    any worker count and a resumed run continues it at ``start_step``. ``context``:
    ``"forkserver"`` or ``"spawn"`` (lance and threaded readers are not fork-safe). A worker
    that dies makes the iterator raise; the workers exit when the iterator is exhausted or
    garbage-collected.
    """
    if context not in ("forkserver", "spawn"):
        raise ValueError(f"context: {context!r} is not 'forkserver' or 'spawn'")
    workers = {"multiprocessing_context": context, "prefetch_factor": prefetch_factor} if num_workers else {}
    loader = torch.utils.data.DataLoader(_StepBatches(make_batch), batch_size=None,
                                         sampler=range(start_step, stop_step),
                                         num_workers=num_workers, collate_fn=_as_is, **workers)
    return iter(loader)

"""The prefetching loader: worker processes make the same batches, in step order, as the
synchronous loop, for stage 1 and stage 2, from folder and tar layouts; bad inputs come back."""
from __future__ import annotations

import os
import tarfile

import cv2
import numpy as np
import pytest
import torch

from cvnet.data.manifest import read_image_bytes, tar_member_uri
from cvnet.training.curriculum import Curriculum, Schedule
from cvnet.training.data import BatchLoader, Stage1Batches, TrainSet, prefetch_batches
from cvnet.training.pairs import PairSampler
from cvnet.training.rerank_data import MapCache, RerankBatches, pair_maps
from cvnet.training.rerank_step import freeze_backbone

LANDMARKS = 4
PER_LANDMARK = 3
BAD = 4  # image index written as garbage bytes


@pytest.fixture(scope="module")
def train_set(tmp_path_factory) -> TrainSet:
    """12 images of 4 landmarks: even indices in a folder, odd ones in a tar shard."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    tar_path = root / "images_000.tar"
    uris = []
    with tarfile.open(tar_path, "w") as tar:
        for i in range(LANDMARKS * PER_LANDMARK):
            data = cv2.imencode(".jpg", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))[1].tobytes()
            data = b"garbage" if i == BAD else data
            name = f"{i % 10}/img{i:02d}.jpg"
            if i % 2:
                (root / "member").write_bytes(data)
                tar.add(root / "member", arcname=name)
                uris.append(tar_member_uri(str(tar_path), name))
            else:
                (root / f"img{i:02d}.jpg").write_bytes(data)
                uris.append(str(root / f"img{i:02d}.jpg"))
    labels = np.repeat(np.arange(LANDMARKS), PER_LANDMARK)
    return TrainSet([f"img{i:02d}" for i in range(len(uris))], uris, labels, np.arange(LANDMARKS) + 50)


class WithPid:
    """A batch function that also says which process made the batch."""

    def __init__(self, make_batch):
        self.make_batch = make_batch

    def __call__(self, step):
        return os.getpid(), self.make_batch(step)


def _loader(train_set):
    return BatchLoader(train_set, 32, (0.5, 1.0), True, read_image_bytes)


def test_stage1_prefetched_batches_equal_the_synchronous_ones(train_set):
    def make():  # a fresh loader per run: one that met a bad image skips it from then on
        return Stage1Batches(_loader(train_set), batch_size=3, rank=1, world_size=2, seed=3,
                             sampling="uniform")

    sync = list(prefetch_batches(WithPid(make()), 0, 5, num_workers=0))
    ahead = list(prefetch_batches(WithPid(make()), 0, 5, num_workers=2))
    assert {pid for pid, _ in sync} == {os.getpid()}
    assert len({pid for pid, _ in ahead}) == 2 and os.getpid() not in {pid for pid, _ in ahead}
    for (_, a), (_, b) in zip(sync, ahead, strict=True):
        assert a.step == b.step
        assert torch.equal(a.queries, b.queries) and torch.equal(a.keys, b.keys)
        assert torch.equal(a.labels, b.labels) and a.queries.shape == (3, 3, 32, 32)
    assert [b.step for _, b in ahead] == list(range(5))
    # the corrupt image came back from a worker, once per process that met it, keyed by index
    reported = {}
    for _, batch in ahead:
        reported.update(batch.bad_inputs)
    assert list(reported) == [BAD] and reported[BAD]["image_id"] == f"img{BAD:02d}"
    # a resumed run continues the same stream
    resumed = list(prefetch_batches(make(), 3, 5, num_workers=0))
    for (_, a), b in zip(sync[3:], resumed, strict=True):
        assert torch.equal(a.queries, b.queries)


def test_stage2_prefetched_batches_make_the_pairs_and_their_maps(train_set):
    sampler = PairSampler(train_set, None, negatives_per_anchor=2, seed=1)
    curriculum = Curriculum(has_prob=Schedule("linear", 0.0, 0.4, ramp_steps=4, name="has_prob"))
    make = RerankBatches(sampler, _loader(train_set), curriculum, batch_size=2, rank=0, world_size=2, seed=1)
    sync = list(prefetch_batches(make, 0, 3, num_workers=0))
    ahead = list(prefetch_batches(make, 0, 3, num_workers=1, context="spawn"))
    for a, b in zip(sync, ahead, strict=True):
        assert torch.equal(a.images, b.images)
        pairs = sampler.worker_pairs(a.step, 2, 0, 2, 0.0)
        np.testing.assert_array_equal(b.pairs.keys, pairs.keys)
        assert b.has_prob == pytest.approx(0.1 * a.step)
        assert len(b.images) == len(np.unique(pairs.anchors)) + len(np.unique(pairs.keys))

    torch.manual_seed(0)
    from cvnet.models.cvnet import CVNet

    backbone = freeze_backbone(CVNet(50))
    batch = ahead[1]
    maps = pair_maps(backbone, batch, "cpu")
    assert maps.queries.shape == (2, 1024, 2, 2) and maps.keys.shape == (6, 1024, 2, 2)
    assert maps.labels.tolist() == [1, 0, 0, 1, 0, 0]
    with torch.no_grad():
        want = backbone.stage3(batch.images[batch.key_pos[:1]])
    torch.testing.assert_close(maps.keys[:1], want)


def test_stage2_fixed_views_and_the_map_cache_give_the_on_the_fly_maps(train_set):
    """views=2: an image's view is one of two fixed ones, the same tensor at every step that draws
    it; the cache computes a view's map once, a hit equals the (float16-rounded) on-the-fly map,
    and a fresh cache (a restarted worker) gives the same maps."""
    from cvnet.models.cvnet import CVNet

    sampler = PairSampler(train_set, None, negatives_per_anchor=1, seed=1)
    make = RerankBatches(sampler, _loader(train_set), Curriculum(), batch_size=2, rank=0,
                         world_size=2, seed=1, views=2)
    batches = list(prefetch_batches(make, 0, 6, num_workers=1, context="spawn"))
    seen = {}
    for batch in batches:
        assert batch.view_keys.shape == (len(batch.images), 2)
        assert set(batch.view_keys[:, 1].tolist()) <= {0, 1}
        np.testing.assert_array_equal(batch.view_keys[:, 0], np.concatenate(
            [np.unique(batch.pairs.anchors), np.unique(batch.pairs.keys)]))
        for key, image in zip(map(tuple, batch.view_keys.tolist()), batch.images):
            assert torch.equal(seen.setdefault(key, image), image)
    assert len(seen) < sum(len(b.images) for b in batches)  # views do repeat across steps
    assert len({k[0] for k in seen if k[1] == 0} & {k[0] for k in seen if k[1] == 1})  # two views of an image
    assert not torch.equal(make(0).images, RerankBatches(sampler, _loader(train_set), Curriculum(), 2, 0, 2, 1)(0).images)

    torch.manual_seed(0)
    backbone = freeze_backbone(CVNet(50))
    cache = MapCache()
    for batch in batches:
        maps = pair_maps(backbone, batch, "cpu", cache=cache)
        with torch.no_grad():
            want = torch.cat([backbone.stage3(image[None]) for image in batch.images]).half().float()
        torch.testing.assert_close(maps.queries, want[batch.query_pos], rtol=0, atol=0)
        torch.testing.assert_close(maps.keys, want[batch.key_pos], rtol=0, atol=0)
    assert cache.misses == len(cache) == len(seen) and cache.hits == sum(len(b.images) for b in batches) - len(seen)
    fresh = pair_maps(backbone, batches[-1], "cpu", cache=MapCache())
    assert torch.equal(fresh.keys, pair_maps(backbone, batches[-1], "cpu", cache=cache).keys)
    with pytest.raises(ValueError, match="map_cache.views"):
        pair_maps(backbone, RerankBatches(sampler, _loader(train_set), Curriculum(), 2, 0, 2, 1)(0), "cpu",
                  cache=MapCache())


def test_stage2_a_self_positive_is_another_view_of_the_anchor(train_set):
    sampler = PairSampler(train_set, None, negatives_per_anchor=1, seed=1, self_positives=1.0)
    for views in (0, 3):  # fresh views, fixed views
        make = RerankBatches(sampler, _loader(train_set), Curriculum(), 2, 0, 2, 1, views)
        for step in range(4):
            batch = make(step)
            pos = np.flatnonzero(batch.pairs.labels == 1)
            anchors = batch.pairs.query_of[pos]
            np.testing.assert_array_equal(batch.pairs.keys[pos], batch.pairs.anchors[anchors])
            for q, k in zip(batch.query_pos[anchors], batch.key_pos[pos]):
                assert q != k and not torch.equal(batch.images[q], batch.images[k])
                if views:
                    assert batch.view_keys[q, 0] == batch.view_keys[k, 0]
                    assert batch.view_keys[q, 1] != batch.view_keys[k, 1]


def test_prefetch_rejects_fork():
    with pytest.raises(ValueError, match="context: 'fork'"):
        prefetch_batches(lambda step: step, 0, 1, num_workers=1, context="fork")

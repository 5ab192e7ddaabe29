"""Stage-2 pair sampler: labels, curriculum proportions, determinism, DDP slices, the mined table."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cvnet.training.curriculum import Schedule
from cvnet.training.data import TrainDataError, TrainSet
from cvnet.training.pairs import PairSampler, mined_negatives

SIZES = [1, 2, 3, 4, 5, 6, 1, 3, 2, 4, 5, 3]  # images per landmark; two singletons
TOP_K = 4


@pytest.fixture(scope="module")
def train_set() -> TrainSet:
    labels = np.repeat(np.arange(len(SIZES)), SIZES)
    labels = labels[np.random.default_rng(0).permutation(len(labels))]  # not grouped by landmark
    ids = [f"img{i:03d}" for i in range(len(labels))]
    return TrainSet(ids, [f"file://{i}.jpg" for i in ids], labels, np.arange(100, 100 + len(SIZES)))


@pytest.fixture(scope="module")
def table(train_set) -> pa.Table:
    """Ranked lists of 8 other-landmark images per image (the mining output layout)."""
    rng = np.random.default_rng(1)
    negatives, scores = [], []
    for label in train_set.labels:
        others = np.flatnonzero(train_set.labels != label)
        negatives.append([train_set.image_ids[i] for i in rng.choice(others, 8, replace=False)])
        scores.append(sorted(rng.random(8), reverse=True))
    return pa.table({"image_id": train_set.image_ids,
                     "landmark_id": train_set.landmark_ids[train_set.labels],
                     "negative_ids": negatives, "negative_scores": scores})


@pytest.fixture(scope="module")
def sampler(train_set, table) -> PairSampler:
    return PairSampler(train_set, table, negatives_per_anchor=3, top_k=TOP_K, seed=5)


def _top_k(table, image_id):
    row = table["image_id"].to_pylist().index(image_id)
    return table["negative_ids"][row].as_py()[:TOP_K]


def test_positives_share_the_landmark_and_negatives_never_do(sampler, train_set):
    ts = train_set
    for step in range(30):
        batch = sampler.global_pairs(step, 8, hard_share=0.5)
        anchor = batch.anchors[batch.query_of]
        same = ts.labels[anchor] == ts.labels[batch.keys]
        np.testing.assert_array_equal(same, batch.labels == 1)
        assert (batch.keys[batch.labels == 1] != anchor[batch.labels == 1]).all()
        assert batch.labels.reshape(8, 4).tolist() == [[1, 0, 0, 0]] * 8
        assert not batch.hard[batch.labels == 1].any()


def test_singletons_are_never_anchors_but_serve_as_negatives(sampler, train_set):
    singles = {i for m in train_set.members if len(m) == 1 for i in m.tolist()}
    assert sampler.singletons == 2 and len(singles) == 2
    anchors, negatives = set(), set()
    for step in range(60):
        batch = sampler.global_pairs(step, 8, hard_share=0.3)
        anchors |= set(batch.anchors.tolist())
        negatives |= set(batch.keys[batch.labels == 0].tolist())
    assert not anchors & singles
    assert singles <= negatives
    assert anchors == set(range(len(train_set))) - singles  # uniform epochs cover every anchor


def test_hard_negatives_come_from_the_anchors_top_k(sampler, train_set, table):
    batch = sampler.global_pairs(3, 16, hard_share=0.6)
    anchor = batch.anchors[batch.query_of]
    hard = np.flatnonzero(batch.hard)
    assert len(hard) > 0
    for p in hard:
        assert train_set.image_ids[batch.keys[p]] in _top_k(table, train_set.image_ids[anchor[p]])
    drawn = {train_set.image_ids[k] for k in batch.keys[hard]}
    assert len(drawn) > 1


def test_hard_share_follows_the_curriculum(sampler, table):
    schedule = Schedule("linear", start=0.0, end=0.9, warmup_steps=10, ramp_steps=100)
    slots = 16 * 3
    for step in (0, 10, 35, 60, 85, 110, 200):
        batch = sampler.global_pairs(step, 16, schedule(step))
        measured = batch.hard[batch.labels == 0].mean()
        assert abs(measured - schedule(step)) <= 1 / slots + 1e-9, step
    # stochastic rounding keeps the share unbiased when share * slots is fractional
    small = PairSampler(sampler.train_set, table, negatives_per_anchor=1)
    fractions = [small.global_pairs(s, 4, 0.37).hard[1::2].mean() for s in range(600)]
    assert abs(np.mean(fractions) - 0.37) < 0.02
    assert set(fractions) == {0.25, 0.5}  # 1.48 hard of 4: one or two


def test_pairs_are_a_pure_function_of_seed_and_step(sampler, train_set, table):
    resumed = PairSampler(train_set, table, negatives_per_anchor=3, top_k=TOP_K, seed=5)
    for step in (0, 7, 41):
        a, b = sampler.global_pairs(step, 8, 0.5), resumed.global_pairs(step, 8, 0.5)
        for field in ("anchors", "keys", "query_of", "labels", "hard"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(sampler.global_pairs(1, 8, 0.5).keys, sampler.global_pairs(2, 8, 0.5).keys)
    other_seed = PairSampler(train_set, table, negatives_per_anchor=3, top_k=TOP_K, seed=6)
    assert not np.array_equal(sampler.global_pairs(1, 8, 0.5).keys, other_seed.global_pairs(1, 8, 0.5).keys)


def test_worker_slices_partition_the_global_batch(sampler):
    whole = sampler.global_pairs(9, 6, 0.5)
    parts = [sampler.worker_pairs(9, 2, rank, 3, 0.5) for rank in range(3)]
    np.testing.assert_array_equal(np.concatenate([p.anchors for p in parts]), whole.anchors)
    np.testing.assert_array_equal(np.concatenate([p.keys for p in parts]), whole.keys)
    np.testing.assert_array_equal(np.concatenate([p.hard for p in parts]), whole.hard)
    for part in parts:
        assert part.query_of.tolist() == [0] * 4 + [1] * 4
        assert len(part.anchors) == 2 and len(part.keys) == 8


def test_balanced_sampling_and_random_negatives_only(train_set):
    sampler = PairSampler(train_set, None, negatives_per_anchor=2, sampling="balanced", seed=0)
    batch = sampler.global_pairs(0, 200, hard_share=1.0)
    assert not batch.hard.any()  # no table: every negative is easy
    counts = np.bincount(train_set.labels[batch.anchors], minlength=len(SIZES))
    assert counts[[0, 6]].sum() == 0 and counts.min(initial=99, where=np.array(SIZES) > 1) > 5


def test_a_mapping_gives_the_same_pairs_as_the_table(sampler, train_set, table):
    mapping = dict(zip(table["image_id"].to_pylist(), table["negative_ids"].to_pylist()))
    other = PairSampler(train_set, mapping, negatives_per_anchor=3, top_k=TOP_K, seed=5)
    np.testing.assert_array_equal(other.global_pairs(4, 8, 0.7).keys, sampler.global_pairs(4, 8, 0.7).keys)


def test_mined_table_rows_and_negatives_outside_the_training_set_are_left_out(train_set):
    a, b = train_set.image_ids[0], train_set.image_ids[int(np.flatnonzero(train_set.labels != train_set.labels[0])[0])]
    mined = mined_negatives({a: ["elsewhere", b], "not-ours": [b]}, train_set)
    assert mined.indices[mined.offsets[0]:mined.offsets[1]].tolist() == [train_set.image_ids.index(b)]
    assert mined.counts(np.arange(len(train_set)), 10).sum() == 1


def test_an_anchor_without_mined_negatives_gets_easy_ones(train_set):
    b = train_set.image_ids[int(np.flatnonzero(train_set.labels != train_set.labels[0])[0])]
    sampler = PairSampler(train_set, {train_set.image_ids[0]: [b]}, negatives_per_anchor=1)
    batch = sampler.global_pairs(0, len(sampler.anchor_pool), hard_share=1.0)
    hard = batch.hard[batch.labels == 0]
    assert hard.sum() <= 1 and (hard == (batch.anchors == 0)).all()


def test_bad_tables_are_rejected_naming_the_item(train_set, table):
    own = train_set.image_ids[int(np.flatnonzero(train_set.labels == train_set.labels[1])[1])]
    with pytest.raises(TrainDataError, match=f"{train_set.image_ids[1]}' lists '{own}' of its own landmark"):
        mined_negatives({train_set.image_ids[1]: [own]}, train_set)
    wrong = table.set_column(1, "landmark_id", pa.array(np.roll(table["landmark_id"].to_numpy(), 1)))
    with pytest.raises(TrainDataError, match="image 'img000' has landmark_id"):
        mined_negatives(wrong, train_set)
    with pytest.raises(TrainDataError, match="image_id 'img000' appears more than once"):
        mined_negatives(pa.concat_tables([table, table.slice(0, 1)]), train_set)
    with pytest.raises(TrainDataError, match="none of the table's 1 rows"):
        mined_negatives({"x": ["y"]}, train_set)
    with pytest.raises(TrainDataError, match=r"missing columns \['negative_ids'\]"):
        mined_negatives(table.drop_columns(["negative_ids"]), train_set)
    with pytest.raises(ValueError, match="hard_share: 1.5"):
        PairSampler(train_set).global_pairs(0, 4, 1.5)


def test_a_set_of_singletons_has_no_anchors():
    ts = TrainSet(["a", "b"], ["a.jpg", "b.jpg"], np.array([0, 1]), np.array([10, 11]))
    with pytest.raises(TrainDataError, match="no landmark has two images"):
        PairSampler(ts)


def test_self_positives_take_their_share_and_leave_the_other_draws_alone(sampler, train_set, table):
    selfish = PairSampler(train_set, table, negatives_per_anchor=3, top_k=TOP_K, seed=5, self_positives=0.4)
    own = []
    for step in range(60):
        a, b = sampler.global_pairs(step, 8, 0.5), selfish.global_pairs(step, 8, 0.5)
        np.testing.assert_array_equal(a.anchors, b.anchors)
        np.testing.assert_array_equal(a.keys[a.labels == 0], b.keys[b.labels == 0])
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.hard, b.hard)
        positive = b.keys[b.labels == 1]
        same = positive == b.anchors
        np.testing.assert_array_equal(positive[~same], a.keys[a.labels == 1][~same])
        own.append(same)
    assert np.mean(own) == pytest.approx(0.4, abs=0.06)  # 480 draws: 4 standard deviations
    always = PairSampler(train_set, table, negatives_per_anchor=3, top_k=TOP_K, seed=5, self_positives=1.0)
    batch = always.global_pairs(3, 8, 0.5)
    np.testing.assert_array_equal(batch.keys[batch.labels == 1], batch.anchors)
    with pytest.raises(ValueError, match="self_positives: 1.5"):
        PairSampler(train_set, table, self_positives=1.5)

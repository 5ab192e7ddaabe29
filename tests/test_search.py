"""Exact tiled search (cvnet.search) against a brute-force numpy reference."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import cvnet.search as search_module
from cvnet.search import MARGIN, Descriptors, Tiles, TopK, merge, plan_tiles, recall_at_k, search, tile_bytes

K = 10
BIG_CLASS = 150  # one landmark larger than k and than the gallery tile below
TILES = Tiles(queries=64, gallery=100)


def reference(queries: Descriptors, gallery: Descriptors, k: int, exclude_self: bool = True,
              dtype: type = np.float64) -> TopK:
    """Every query against every gallery item in numpy (``dtype``, rounded to float32), filtered,
    sorted by (-score, id)."""
    qx, gx = np.asarray(queries.vectors, dtype), np.asarray(gallery.vectors, dtype)
    qid, gid = np.asarray(queries.ids, str), np.asarray(gallery.ids, str)
    scores = (qx @ gx.T).astype(np.float32)
    ids = np.full((len(qid), k), "", dtype=object)
    best = np.full((len(qid), k), -np.inf, dtype=np.float32)
    for row in range(len(qid)):
        keep = np.ones(len(gid), bool)
        if exclude_self:
            keep &= gid != qid[row]
        if queries.landmarks is not None and gallery.landmarks is not None and queries.landmarks[row] >= 0:
            keep &= np.asarray(gallery.landmarks) != queries.landmarks[row]
        columns = np.flatnonzero(keep)
        order = columns[np.lexsort((gid[columns], -scores[row, columns]))][:k]
        ids[row, : len(order)], best[row, : len(order)] = gid[order], scores[row, order]
    return TopK(qid, ids.astype(str), best, pairs=len(qid) * len(gid))


def assert_same(result: TopK, expected: TopK) -> None:
    np.testing.assert_array_equal(result.query_ids, expected.query_ids)
    np.testing.assert_array_equal(result.ids, expected.ids)
    assert result.scores.dtype == np.float32
    finite = np.isfinite(expected.scores)
    np.testing.assert_array_equal(np.isfinite(result.scores), finite)
    assert np.abs(result.scores[finite] - expected.scores[finite]).max(initial=0) <= 1e-6


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def dataset() -> Descriptors:
    """1200 images, ~150 landmarks, one landmark of BIG_CLASS images, some without a landmark;
    ids shuffled so that id order is not row order; a shared component makes classes cluster."""
    rng = np.random.default_rng(0)
    n, d = 1200, 32
    landmarks = rng.integers(0, 150, n)
    landmarks[rng.choice(n, BIG_CLASS, replace=False)] = 1000
    landmarks[(rng.random(n) < 0.05) & (landmarks != 1000)] = -1
    centres = unit_rows(rng, 1001, d)
    x = centres[np.maximum(landmarks, 0)] + 0.7 * unit_rows(rng, n, d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.array([f"img{i:05d}" for i in rng.permutation(n)])
    return Descriptors(x.astype(np.float32), ids, landmarks)


def subset(data: Descriptors, rows: np.ndarray) -> Descriptors:
    return Descriptors(data.vectors[rows], np.asarray(data.ids)[rows], np.asarray(data.landmarks)[rows])


def test_matches_reference_with_a_class_larger_than_k_and_the_tile(dataset):
    assert np.bincount(dataset.landmarks[dataset.landmarks >= 0]).max() == BIG_CLASS > TILES.gallery > K
    rng = np.random.default_rng(1)
    inside = subset(dataset, rng.choice(len(dataset.ids), 300, replace=False))  # queries in the gallery
    outside = Descriptors(unit_rows(rng, 40, 32), [f"q{i}" for i in range(40)], rng.integers(-1, 150, 40))
    for queries in (inside, outside):
        result = search(queries, dataset, K, tiles=TILES)
        assert_same(result, reference(queries, dataset, K))
        assert_same(result, reference(queries, dataset, K, dtype=np.float32))  # fp32 numpy: same here
        assert result.pairs == len(queries.ids) * len(dataset.ids)
    big = np.flatnonzero(inside.landmarks == 1000)
    assert len(big) > 0  # queries of the big class were searched, and got only other landmarks
    lm_of = dict(zip(dataset.ids, dataset.landmarks))
    assert all(lm_of[i] != 1000 for i in search(inside, dataset, K, tiles=TILES).ids[big].ravel())


def test_default_tiles_and_a_small_memory_budget_give_the_same_result(dataset):
    queries = subset(dataset, np.arange(200))
    whole = search(queries, dataset, K)
    tight = search(queries, dataset, K, memory_budget=200_000)
    assert_same(whole, reference(queries, dataset, K))
    np.testing.assert_array_equal(tight.ids, whole.ids)
    np.testing.assert_array_equal(tight.scores, whole.scores)  # bit for bit: the tiling does not matter


def test_ties_are_ordered_by_id_across_tiles_and_at_the_kth_place():
    """Small-integer vectors: every product is exact in fp32, so duplicates tie exactly."""
    rng = np.random.default_rng(2)
    base = rng.integers(-2, 3, (12, 8)).astype(np.float32) / 8
    gallery_rows = base[rng.integers(0, 12, 300)]  # each vector ~25 times under different ids
    ids = np.array([f"g{i:04d}" for i in rng.permutation(300)])
    gallery = Descriptors(gallery_rows, ids)
    queries = Descriptors(base, [f"q{i}" for i in range(12)])
    for tiles in (Tiles(5, 7), Tiles(12, 300), Tiles(1, 64)):
        result = search(queries, gallery, K, tiles=tiles)
        assert_same(result, reference(queries, gallery, K))
    for row_ids, row_scores in zip(result.ids, result.scores):
        for score in np.unique(row_scores):
            tied = list(row_ids[row_scores == score])
            assert tied == sorted(tied)
    assert (result.scores[:, K - 1] == result.scores[:, K - 2]).any()  # a tie really sat at the k-th place


def test_near_ties_below_fp32_rounding_come_out_in_exact_order(monkeypatch):
    """Gallery items whose scores differ by less than the fp32 GEMM's rounding error: the tiles
    rank them in noise, and only the bounded re-score (first k plus every candidate within the
    error bound of them) puts the float64 order back, at the k-th place too."""
    rng = np.random.default_rng(3)
    d = 512
    base = unit_rows(rng, 1, d)
    gallery_rows = base + 2e-5 * rng.standard_normal((400, d)).astype(np.float32)
    gallery_rows /= np.linalg.norm(gallery_rows, axis=1, keepdims=True)
    gallery = Descriptors(gallery_rows.astype(np.float32), [f"g{i:04d}" for i in rng.permutation(400)])
    queries = Descriptors(base + 1e-3 * unit_rows(rng, 30, d), [f"q{i}" for i in range(30)])
    expected = reference(queries, gallery, K)
    gaps = np.diff(-expected.scores, axis=1)
    assert (gaps < 1e-6).mean() > 0.5  # most neighbours are closer than fp32 can tell apart
    fp32 = reference(queries, gallery, K, dtype=np.float32)
    assert not np.array_equal(fp32.ids, expected.ids)  # a plain fp32 ranking gets the order wrong
    widths, search_tiles = [], search_module._search_tiles

    def counted(q, g, k, *rest):
        widths.append((len(q), k))
        return search_tiles(q, g, k, *rest)

    monkeypatch.setattr(search_module, "_search_tiles", counted)
    for tiles in (Tiles(30, 400), Tiles(7, 50)):
        assert_same(search(queries, gallery, K, tiles=tiles), expected)
    assert widths[0] == (30, K + MARGIN)
    assert any(k > K + MARGIN for _, k in widths), widths  # more near-ties than the margin: searched again wider


def test_self_is_excluded_and_only_with_exclude_self(dataset):
    everyone = Descriptors(dataset.vectors, dataset.ids)  # all-vs-all, no landmarks
    result = search(everyone, everyone, K, tiles=TILES)
    assert_same(result, reference(everyone, everyone, K))
    assert not (result.ids == result.query_ids[:, None]).any()
    kept = search(everyone, everyone, K, tiles=TILES, exclude_self=False)
    assert_same(kept, reference(everyone, everyone, K, exclude_self=False))
    np.testing.assert_array_equal(kept.ids[:, 0], kept.query_ids)


def test_gallery_blocks_merge_into_the_one_pass_result(dataset):
    queries = subset(dataset, np.arange(0, 1200, 7))
    whole = search(queries, dataset, K, tiles=TILES)
    bounds = [0, 0, 333, 700, 1200]  # the first block is empty
    parts = [search(queries, subset(dataset, np.arange(a, b)), K, tiles=TILES) for a, b in zip(bounds, bounds[1:])]
    assert parts[0].pairs == 0 and (parts[0].ids == "").all() and np.isneginf(parts[0].scores).all()
    merged = merge(*parts)
    np.testing.assert_array_equal(merged.ids, whole.ids)
    np.testing.assert_array_equal(merged.scores, whole.scores)
    assert merged.pairs == whole.pairs
    np.testing.assert_array_equal(merge(parts[2], parts[0], parts[3], parts[1]).ids, whole.ids)  # order-free


def test_incremental_old_vs_new_equals_a_full_search_with_fewer_pairs(dataset):
    n = len(dataset.ids)
    old, new = subset(dataset, np.arange(900)), subset(dataset, np.arange(900, n))
    keep = 32
    full = search(dataset, dataset, keep, tiles=TILES)
    stored = search(old, old, keep, tiles=TILES)  # the mining table of the old version
    new_rows = search(new, dataset, keep, tiles=TILES)  # new rows against everything
    old_rows = merge(stored, search(old, new, keep, tiles=TILES))  # old rows against the new rows only
    np.testing.assert_array_equal(np.concatenate([old_rows.ids, new_rows.ids]), full.ids)
    np.testing.assert_array_equal(np.concatenate([old_rows.scores, new_rows.scores]), full.scores)
    redone = new_rows.pairs + old_rows.pairs - stored.pairs
    assert redone == 300 * n + 900 * 300 < full.pairs == n * n


def test_half_precision_recall_is_high_and_exactly_counted(dataset):
    queries = subset(dataset, np.arange(0, 1200, 3))
    exact = search(queries, dataset, K, tiles=TILES)
    for precision in ("fp16", "bf16"):
        approx = search(queries, dataset, K, tiles=TILES, precision=precision)
        recall = recall_at_k(approx, exact)
        counted = sum(len(set(a) & set(e)) for a, e in zip(approx.ids, exact.ids)) / exact.ids.size
        print(f"{precision} recall@{K} against fp32: {recall:.4f}")
        assert recall == pytest.approx(counted, abs=1e-12)
        assert 0.9 <= recall <= 1.0
        narrow = recall_at_k(search(queries, dataset, K, tiles=TILES, precision=precision, margin=0), exact)
        print(f"{precision} recall@{K} with margin 0: {narrow:.4f}")
        assert narrow <= recall
        common = approx.ids[:, :, None] == exact.ids[:, None, :]  # the same item is scored exactly
        assert (approx.scores[:, :, None] == exact.scores[:, None, :])[common].all()
    assert recall_at_k(exact, exact) == 1.0
    shifted = TopK(exact.query_ids, np.roll(exact.ids, 1, axis=0), exact.scores)
    assert recall_at_k(shifted, exact) < 0.1


def test_fewer_candidates_than_k_are_padded():
    rng = np.random.default_rng(3)
    gallery = Descriptors(unit_rows(rng, 6, 4), list("abcdef"), [1, 1, 2, -1, None, 2])
    queries = Descriptors(unit_rows(rng, 3, 4), ["a", "x", "y"], [1, None, 2])
    result = search(queries, gallery, K, tiles=Tiles(2, 4))
    assert_same(result, reference(Descriptors(queries.vectors, queries.ids, [1, -1, 2]),
                                  Descriptors(gallery.vectors, gallery.ids, [1, 1, 2, -1, -1, 2]), K))
    assert (result.ids != "").sum(axis=1).tolist() == [4, 6, 4]
    assert np.isneginf(result.scores[result.ids == ""]).all()
    empty = search(queries, Descriptors(np.zeros((0, 4), np.float32), []), 3)
    assert empty.ids.shape == (3, 3) and (empty.ids == "").all() and empty.pairs == 0
    none = search(Descriptors(np.zeros((0, 4), np.float32), []), gallery, 3)
    assert none.ids.shape == (0, 3)


def test_merge_rejects_overlapping_or_mismatched_parts(dataset):
    queries = subset(dataset, np.arange(5))
    part = search(queries, subset(dataset, np.arange(100)), K)
    with pytest.raises(ValueError, match="more than one part"):
        merge(part, part)
    with pytest.raises(ValueError, match="query_ids"):
        merge(part, search(subset(dataset, np.arange(1, 6)), dataset, K))
    with pytest.raises(ValueError, match="k: 11"):
        merge(part, k=K + 1)
    assert merge(part, k=3).ids.tolist() == part.ids[:, :3].tolist()


def test_read_only_arrays_are_searched_in_place_without_warnings(dataset):
    """An actor's gallery from the object store is a read-only array: used in place, no warning."""
    frozen = dataset.vectors.copy()
    frozen.setflags(write=False)
    gallery = Descriptors(frozen, dataset.ids, dataset.landmarks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = search(subset(dataset, np.arange(50)), gallery, K, tiles=TILES)
    assert_same(result, reference(subset(dataset, np.arange(50)), dataset, K))


def test_inputs_are_checked_by_name(dataset):
    two = Descriptors(np.eye(2, dtype=np.float32), ["a", "a"])
    with pytest.raises(ValueError, match="gallery.ids: 'a'"):
        search(two, two, 1)
    with pytest.raises(ValueError, match="dim"):
        search(Descriptors(np.eye(3, dtype=np.float32), list("abc")), Descriptors(np.eye(2, dtype=np.float32), list("ab")), 1)
    with pytest.raises(ValueError, match="NaN"):
        search(Descriptors(np.full((1, 2), np.nan, np.float32), ["q"]), two, 1)
    with pytest.raises(ValueError, match="precision"):
        search(two, Descriptors(np.eye(2, dtype=np.float32), list("ab")), 1, precision="fp8")
    with pytest.raises(ValueError, match="queries.ids"):
        search(Descriptors(dataset.vectors[:2], ["a"]), dataset, 1)


def test_plan_tiles_fits_the_budget_and_grows_with_it():
    small = plan_tiles(50_000, 1_000_000, 2048, 32, 64 << 20, "fp32", largest_class=6300)
    large = plan_tiles(50_000, 1_000_000, 2048, 32, 2 << 30, "bf16", largest_class=6300)
    assert tile_bytes(*small, 2048, 32, "fp32", 6300) <= 64 << 20
    assert tile_bytes(*large, 2048, 32, "bf16", 6300) <= 2 << 30
    assert small.gallery < large.gallery and small.queries <= large.queries
    assert plan_tiles(3, 5, 8, 2) == Tiles(3, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference(dataset):
    """The CPU tests above on CUDA tensors (same code; TF32 must stay off in fp32)."""
    queries = subset(dataset, np.arange(0, 1200, 4))
    on_gpu = lambda d: Descriptors(torch.from_numpy(d.vectors).cuda(), d.ids, d.landmarks)  # noqa: E731
    result = search(on_gpu(queries), on_gpu(dataset), K, tiles=TILES)
    assert_same(result, reference(queries, dataset, K))
    assert recall_at_k(search(on_gpu(queries), on_gpu(dataset), K, precision="fp16"), result) >= 0.9

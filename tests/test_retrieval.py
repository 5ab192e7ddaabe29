"""cvnet.retrieval: shortlists (raw and GT-aware), batched re-ranking, fusion, rankings metrics."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cvnet.eval.revisitop import evaluate
from cvnet.index import ranks_for_revisitop
from cvnet.retrieval import (RANKINGS_SCHEMA, evaluate_rankings, fuse, global_search, protocol_junk,
                             rankings_to_topk, remove_junk, rerank_probabilities, retrieve)
from cvnet.search import Descriptors, TopK


def unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_fuse_reranks_head_and_keeps_tail_in_global_order():
    ranking = TopK(np.array(["q"]), np.array([["a", "b", "c", "d", "e"]]),
                   np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], dtype=np.float32))
    table = fuse(ranking, np.array([[0.0, 0.1, 1.0]], dtype=np.float32), weight=0.5)
    assert table.schema == RANKINGS_SCHEMA
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == ["c", "a", "b", "d", "e"]  # 1.2, 0.9, 0.85 | tail
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["score"] == pytest.approx(0.7 + 0.5 * 1.0)
    assert [r["rerank_score"] for r in rows[3:]] == [None, None]
    assert [r["score"] for r in rows[3:]] == pytest.approx([0.6, 0.5])


def test_fuse_weight_and_ties_keep_global_order():
    ranking = TopK(np.array(["q"]), np.array([["a", "b", "c"]]), np.array([[0.5, 0.5, 0.3]], dtype=np.float32))
    probs = np.array([[0.2, 0.2, 0.9]], np.float32)
    order = lambda w: [r["image_id"] for r in fuse(ranking, probs, weight=w).to_pylist()]  # noqa: E731
    assert order(0.5) == ["c", "a", "b"]  # 0.75, then a and b tie at 0.6: global order
    assert order(0.25) == ["a", "b", "c"]  # 0.55, 0.55, 0.525
    assert order(0.0) == ["a", "b", "c"]


def test_remove_junk_moves_later_items_up_and_pads():
    ranking = TopK(np.array(["q1", "q2"]), np.array([["a", "b", "c"], ["c", "a", "b"]]),
                   np.array([[3, 2, 1], [3, 2, 1]], dtype=np.float32))
    out = remove_junk(ranking, [{"b"}, {"c", "a"}])
    assert out.ids.tolist() == [["a", "c", ""], ["b", "", ""]]
    assert out.scores[0].tolist() == [3, 1, -np.inf] and out.scores[1, 0] == 1
    table = fuse(out, None)
    assert table.filter(pa.compute.equal(table["query_id"], "q2"))["image_id"].to_pylist() == ["b"]


def test_retrieve_equals_direct_computation():
    """Fused rankings equal scoring every (query, candidate) pair by hand; one score call per query."""
    rng = np.random.default_rng(0)
    q, g = unit(rng, 4), unit(rng, 30)
    gallery_ids = [f"g{i:02d}" for i in range(30)]
    ranking = global_search(Descriptors(q, [f"q{i}" for i in range(4)]), Descriptors(g, gallery_ids), depth=12)
    qf = {f"q{i}": q[i] for i in range(4)}
    gf = dict(zip(gallery_ids, g))
    weights = rng.standard_normal(16).astype(np.float32)
    calls = []

    def score(query, candidates):
        calls.append(len(candidates))
        return 1 / (1 + np.exp(-np.stack(candidates) @ (query * weights)))

    table = retrieve(ranking, 5, score, qf, gf, weight=0.5)
    assert calls == [5, 5, 5, 5]
    for i in range(4):
        sims = g @ q[i]
        top = np.argsort(-sims, kind="stable")[:12]
        p = 1 / (1 + np.exp(-g[top[:5]] @ (q[i] * weights)))
        fused = sims[top[:5]] + 0.5 * p
        head = top[:5][np.argsort(-fused, kind="stable")]
        expected = [gallery_ids[j] for j in np.r_[head, top[5:]]]
        rows = table.filter(pa.compute.equal(table["query_id"], f"q{i}")).sort_by("rank")
        assert rows["image_id"].to_pylist() == expected
        np.testing.assert_allclose(rows["score"].to_numpy()[:5], np.sort(fused)[::-1], atol=1e-6)


def test_rerank_probabilities_rejects_wrong_length():
    ranking = TopK(np.array(["q"]), np.array([["a", "b"]]), np.array([[1, 0.5]], np.float32))
    with pytest.raises(ValueError, match="query 'q': 1 probabilities for 2 candidates"):
        rerank_probabilities(ranking, 2, lambda qf, cf: np.zeros(1), {"q": 0}, {"a": 0, "b": 0})


GT = {"imlist": [f"d{i}" for i in range(8)], "qimlist": ["x", "y"],
      "gnd": [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [5, 6], "junk": [7]}]}


def full_rankings(rng):
    q, db = unit(rng, 2, 8), unit(rng, 8, 8)
    ranking = global_search(Descriptors(q, ["x", "y"]), Descriptors(db, GT["imlist"]), depth=8)
    return q, db, ranking


def test_evaluate_rankings_equals_revisitop_on_full_rankings():
    q, db, ranking = full_rankings(np.random.default_rng(1))
    got = evaluate_rankings(fuse(ranking, None), GT, ["x", "y"])
    want = evaluate(ranks_for_revisitop(q, db), GT)
    for protocol in want:
        assert got[protocol] == pytest.approx(want[protocol])


def test_evaluate_rankings_counts_missing_positives_as_not_retrieved():
    # query x: positives d0 d1 (easy); a top-2 list holding only d0 first: AP = 1/2, not 1
    ranking = TopK(np.array(["x", "y"]), np.array([["d0", "d7"], ["d4", "d0"]]),
                   np.array([[1, 0.5], [1, 0.5]], np.float32))
    got = evaluate_rankings(fuse(ranking, None), GT, ["x", "y"], protocols=["easy"])
    assert got["easy"]["map"] == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(KeyError, match="'z'"):
        evaluate_rankings(fuse(ranking, None), GT, ["x", "z"])


def test_gt_aware_shortlist_reranks_k_non_junk_candidates():
    """GT-aware for Hard: the easy and junk images of a query leave the list before the top k
    are re-ranked, so k hard/negative candidates get probabilities."""
    ranking = TopK(np.array(["x"]), np.array([["d0", "d3", "d2", "d5", "d1"]]),
                   np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], np.float32))
    junk = protocol_junk(GT, "hard", [0])
    assert junk == [{"d3", "d0", "d1"}]
    probs = {"d2": 1.0, "d5": 0.0}
    table = retrieve(ranking, 2, lambda qf, cf: np.array([probs[c] for c in cf]), {"x": None},
                     {i: i for i in GT["imlist"]}, junk=junk)
    assert table["image_id"].to_pylist() == ["d2", "d5"]
    assert table["rerank_score"].to_pylist() == [1.0, 0.0]
    raw = retrieve(ranking, 2, lambda qf, cf: np.zeros(len(cf)), {"x": None}, {i: i for i in GT["imlist"]})
    assert raw["rerank_score"].to_pylist()[:2] == [0.0, 0.0] and raw["rerank_score"].null_count == 3


def test_rankings_to_topk_round_trip():
    _, _, ranking = full_rankings(np.random.default_rng(2))
    back = rankings_to_topk(fuse(ranking, None), ["y", "x"], column="global_score")
    assert back.ids.tolist() == ranking.ids[::-1].tolist()
    np.testing.assert_array_equal(back.scores, ranking.scores[::-1])


def test_key_major_probability_equals_match_probability_per_query():
    """One gallery image against queries of two sizes in one call == match_probability per pair."""
    import torch

    from cvnet.models.cvnet import CVNet
    from cvnet.models.rerank import compute_rerank_features, match_probability
    from cvnet.models.synthetic_weights import synthetic_state_dict
    from cvnet.models.rerank import key_major_probability

    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 0))
    rng = np.random.default_rng(0)
    feat = lambda h, w: compute_rerank_features(  # noqa: E731
        torch.from_numpy(rng.standard_normal((1024, h, w)).astype(np.float32)), model.conv2ds)
    key, queries = feat(6, 8), [feat(5, 7), feat(6, 8), feat(5, 7), feat(4, 4)]
    got = key_major_probability(model.cv_learner, key, queries, batch_size=1 << 20)
    want = np.array([match_probability(model.cv_learner, q, [key])[0] for q in queries])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.std() > 1e-4  # the queries really score differently

"""Revisitop mAP / mP@k and GLDv2 mAP@100: hand-computed cases, the real ground truth, top-K."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cvnet.data.gldv2 import read_gldv2_csv
from cvnet.data.revisitop import PROTOCOLS, load_ground_truth, protocol_sets
from cvnet.eval.gldv2 import average_precision_at_k, map_at_100, per_query_ap, predictions_from_rankings
from cvnet.eval.revisitop import evaluate, evaluate_per_query, format_results

REVISITOP = Path(__file__).parent / "fixtures" / "revisitop"
KS = (1, 5, 10)


def reference_terms(column: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The published revisitop loop (compute_map), np.in1d -> np.isin: per-positive AP terms
    and the 1-based junk-adjusted positions."""
    pos = np.arange(len(column))[np.isin(column, ok)]
    junk_pos = np.arange(len(column))[np.isin(column, junk)]
    k = ij = 0
    for ip in range(len(pos)):
        while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
            k += 1
            ij += 1
        pos[ip] -= k
    terms = []
    for j, rank in enumerate(pos):
        precision_0 = 1.0 if rank == 0 else j / rank
        terms.append((precision_0 + (j + 1) / (rank + 1)) / 2 / len(ok))
    return np.array(terms), pos + 1


def reference_map(ranks: np.ndarray, gnd: list[dict], protocol: str) -> dict[str, float]:
    aps, prs = [], []
    for q, entry in enumerate(gnd):
        ok, junk = protocol_sets(entry, protocol)
        if len(ok) == 0:
            continue
        terms, pos = reference_terms(ranks[:, q], ok, junk)
        aps.append(terms.sum())
        prs.append([(pos <= min(pos.max(), k)).sum() / min(pos.max(), k) for k in KS])
    return {"map": float(np.mean(aps)), **{f"mp@{k}": float(np.mean(p)) for k, p in zip(KS, np.array(prs).T)}}


def synthetic_ranks(gt: dict, seed: int) -> np.ndarray:
    """A plausible ranking: every database image scored, positives pushed up by a random boost."""
    rng = np.random.default_rng(seed)
    n_db, n_q = len(gt["imlist"]), len(gt["qimlist"])
    scores = rng.random((n_db, n_q))
    for q, entry in enumerate(gt["gnd"]):
        for key, boost in (("easy", 0.9), ("hard", 0.5), ("junk", 0.6)):
            idx = np.asarray(entry[key], dtype=int)
            scores[idx, q] += boost * rng.random(len(idx))
    return np.argsort(-scores, axis=0)


# ---- revisitop: hand-computed ----------------------------------------------------------------

HAND_GND = [
    {"easy": [2], "hard": [5], "junk": [1]},
    {"easy": [0, 3], "hard": [], "junk": []},  # no hard positive: left out of the hard mean
]


def test_hand_computed_values():
    ranks = np.stack([np.arange(10), np.array([3, 9, 8, 7, 6, 0, 5, 4, 2, 1])], axis=1)
    per_query = evaluate_per_query(ranks, HAND_GND)
    # query 0, medium: positives at raw 2 and 5, junk at raw 1 -> adjusted ranks 1 and 4
    assert per_query["medium"]["ap"][0] == pytest.approx(((0 / 1 + 1 / 2) / 2 + (1 / 4 + 2 / 5) / 2) / 2)
    assert [per_query["medium"][f"p@{k}"][0] for k in KS] == pytest.approx([0, 2 / 5, 2 / 5])
    # easy: hard item 5 is junk too -> one positive at adjusted rank 1; kq = min(2, k)
    assert per_query["easy"]["ap"][0] == pytest.approx((0 + 1 / 2) / 2)
    assert [per_query["easy"][f"p@{k}"][0] for k in KS] == pytest.approx([0, 1 / 2, 1 / 2])
    # hard: easy item 2 and junk 1 removed -> positive at adjusted rank 3
    assert per_query["hard"]["ap"][0] == pytest.approx((0 + 1 / 4) / 2)
    assert [per_query["hard"][f"p@{k}"][0] for k in KS] == pytest.approx([0, 1 / 4, 1 / 4])
    # query 1: positives 3 (rank 0) and 0 (rank 5)
    assert per_query["easy"]["ap"][1] == pytest.approx((1 + 1 + 1 / 5 + 2 / 6) / 2 / 2)
    assert np.isnan(per_query["hard"]["ap"][1])
    results = evaluate(ranks, {"gnd": HAND_GND})
    assert results["hard"]["map"] == pytest.approx(per_query["hard"]["ap"][0])
    assert results["easy"]["map"] == pytest.approx(np.mean(per_query["easy"]["ap"]))
    assert results["easy"]["mp@1"] == pytest.approx(0.5)
    assert set(results) == set(PROTOCOLS) and set(results["easy"]) == {"map", "mp@1", "mp@5", "mp@10"}


def test_perfect_ranking_scores_one():
    ranks = np.array([[2, 0], [5, 3], [1, 1], [0, 2], [3, 4], [4, 5]])
    results = evaluate(ranks, HAND_GND)
    assert results["medium"]["map"] == pytest.approx(1.0)
    assert results["medium"]["mp@1"] == pytest.approx(1.0)
    assert "medium map=100.00  mp@1=100.00" in format_results(results)


def test_truncated_list_without_positives_scores_zero():
    # top-3 lists; query 0 has no positive in its list, query 1 has one of its two;
    # 10_000 is a distractor index beyond the database (as with R1M appended)
    ranks = np.array([[0, 3], [4, 9], [10_000, 8]])
    per_query = evaluate_per_query(ranks, HAND_GND)
    assert per_query["medium"]["ap"][0] == 0.0
    assert [per_query["medium"][f"p@{k}"][0] for k in KS] == [0.0, 0.0, 0.0]
    # the missing positive counts in n_pos (2) and sits after the list, so kq = k
    assert per_query["easy"]["ap"][1] == pytest.approx((1 + 1) / 2 / 2)
    assert [per_query["easy"][f"p@{k}"][1] for k in KS] == pytest.approx([1, 1 / 5, 1 / 10])
    results = evaluate(ranks, HAND_GND)
    assert results["easy"]["mp@1"] == pytest.approx(0.5)  # both queries in the mean


def test_bad_rank_arrays_are_refused():
    with pytest.raises(ValueError, match="2 columns.*3 queries"):
        evaluate(np.zeros((5, 2), dtype=int), HAND_GND + HAND_GND[:1])
    with pytest.raises(ValueError, match="integer"):
        evaluate(np.zeros((5, 2)), HAND_GND)


# ---- revisitop: real ground truth -------------------------------------------------------------

@pytest.fixture(scope="module", params=["roxford5k", "rparis6k"])
def real(request):
    gt = load_ground_truth(str(REVISITOP / f"gnd_{request.param}.pkl"))
    return gt, synthetic_ranks(gt, seed=len(request.param))


def test_full_ranking_matches_reference(real):
    gt, ranks = real
    results = evaluate(ranks, gt)
    for protocol in PROTOCOLS:
        expected = reference_map(ranks, gt["gnd"], protocol)
        assert results[protocol] == pytest.approx(expected, abs=1e-12)
        assert 0.0 < results[protocol]["map"] < 1.0


def test_top100_ranking(real):
    gt, ranks = real
    top = ranks[:100]
    full_q = evaluate_per_query(ranks, gt)
    top_q = evaluate_per_query(top, gt)
    checked_p = 0
    for protocol in PROTOCOLS:
        for q, entry in enumerate(gt["gnd"]):
            ok, junk = protocol_sets(entry, protocol)
            if len(ok) == 0:
                assert np.isnan(top_q[protocol]["ap"][q])
                continue
            terms, _ = reference_terms(ranks[:, q], ok, junk)
            in_list = np.isin(ranks[:, q][np.isin(ranks[:, q], ok)], top[:, q])
            # positives after the list add nothing; the ones in it add exactly their full-list term
            assert top_q[protocol]["ap"][q] == pytest.approx(terms[in_list].sum(), abs=1e-12)
            if np.count_nonzero(~np.isin(top[:, q], junk)) >= max(KS):
                checked_p += 1
                for k in KS:
                    assert top_q[protocol][f"p@{k}"][q] == pytest.approx(full_q[protocol][f"p@{k}"][q])
    assert checked_p > 100  # most (query, protocol) pairs have >= 10 non-junk images in the top 100
    results = evaluate(top, gt)
    full = evaluate(ranks, gt)
    assert all(results[p]["map"] <= full[p]["map"] for p in PROTOCOLS)


# ---- GLDv2 mAP@100 ---------------------------------------------------------------------------

def test_gldv2_map_at_100_hand_made(workdir):
    path = workdir / "retrieval_solution_v2.1.csv"
    path.write_text("id,images,Usage\n"
                    "q01,aaa bbb,Public\n"
                    "q02,ccc,Private\n"
                    "q03,None,Ignored\n"
                    "q04,ddd eee fff,Public\n")
    predictions = {
        "q01": ["aaa", "aaa", "xxx", "bbb"],  # the duplicate is skipped: hits at 0 and 2
        "q02": ["xxx", "ccc"],
        "q03": ["aaa"],                       # ignored query: not scored
        # q04 has no prediction: scores 0 and stays in the Public mean
    }
    aps = per_query_ap(predictions, str(path))
    assert aps["Public"] == pytest.approx({"q01": (1 / 1 + 2 / 3) / 2, "q04": 0.0})
    assert aps["Private"] == pytest.approx({"q02": 1 / 2})
    scores = map_at_100(predictions, read_gldv2_csv(str(path)))
    assert scores == pytest.approx({"Public": (1 / 1 + 2 / 3) / 2 / 2, "Private": 0.5})
    with pytest.raises(KeyError, match="q99"):
        map_at_100({"q99": ["aaa"]}, str(path))


def test_gldv2_predictions_from_rankings_table():
    rankings = pa.table({"query_id": ["q2", "q1", "q1", "q2", "q1"], "rank": [1, 2, 0, 0, 1],
                         "image_id": ["b", "z", "x", "a", "y"], "score": [0.1] * 5})
    assert predictions_from_rankings(rankings) == {"q1": ["x", "y", "z"], "q2": ["a", "b"]}
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['rank'\]"):
        predictions_from_rankings(rankings.drop_columns(["rank"]))


def test_gldv2_ap_cutoff_at_100():
    relevant = {f"r{i:03d}" for i in range(150)}
    ranked = [f"n{i}" for i in range(99)] + ["r000", "r001"]  # one hit inside the top 100
    assert average_precision_at_k(ranked, relevant) == pytest.approx((1 / 100) / 100)
    perfect = sorted(relevant)
    assert average_precision_at_k(perfect, relevant) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="without relevant"):
        average_precision_at_k(["a"], set())


def test_evaluate_gldv2_cli_scores_a_committed_rankings_table(tmp_path, capsys):
    """cvnet evaluate-gldv2 reads a rankings table (cvnet.retrieval contract) and the solution CSV."""
    import json

    from cvnet.retrieval import RANKINGS_SCHEMA, fuse
    from cvnet.search import TopK
    from cvnet.tables import TableWriter, open_or_create, write_table_fragments
    from jobs.cli import main

    ranking = TopK(np.array(["tq1", "tq2", "tq3"]), np.array([["ia1", "ib2"], ["ic3", "ia1"], ["ia1", "ic3"]]),
                   np.array([[0.9, 0.8], [0.7, 0.6], [0.5, 0.4]], np.float32))
    uri = str(tmp_path / "rankings")
    writer = TableWriter(open_or_create(uri, RANKINGS_SCHEMA, "rankings", "query_id", {}), None)
    writer.commit(write_table_fragments(uri, fuse(ranking, None)), ["tq1", "tq2", "tq3"])
    solution = tmp_path / "retrieval_solution_v2.1.csv"
    solution.write_text("id,images,Usage\ntq1,ib2,Public\ntq2,ic3 ia1,Private\ntq3,None,Ignored\ntq4,ia1,Private\n")
    assert main(["evaluate-gldv2", "--rankings", uri, "--solution", str(solution), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # tq1: ib2 at rank 2 -> 1/2; tq2: both hits -> 1; tq4 has no prediction -> 0
    assert got == pytest.approx({"Public": 0.5, "Private": 0.5})

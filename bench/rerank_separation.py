"""Does a re-ranker separate positives from negatives inside the global shortlist? For each
model: the global top-``k`` of every query on a synthetic benchmark, each candidate's class
(positive: easy or hard; junk; negative of the query's landmark family; other negative), and
the AUC of positives against negatives of the global cosine, the match probability ``p`` and
the fused score (0.5: no better than chance), plus the re-ranker-only mAP (``p`` alone orders
the shortlist) and the fused mAP. The mAP of a ranking mixes the shortlist's quality with the
re-ranker's; the AUC isolates the re-ranker. ``--training-free`` adds a scorer that learns
nothing: the share of mutual nearest neighbours between the raw stage-3 maps of the query and
the candidate, the verification signal the maps carry before any training.

    .venv/bin/python bench/rerank_separation.py --synth /tmp/rq/synth \\
        --start /tmp/rq/stage1-seed0.pth --trained <store>/checkpoints/<run>/step_00000200 [--training-free]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half."""
    if not len(pos) or not len(neg):
        return float("nan")
    diff = np.asarray(pos)[:, None] - np.asarray(neg)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def mutual_nn(query: torch.Tensor, keys: list[torch.Tensor]) -> np.ndarray:
    """Training-free verification: the share of the query map's positions whose nearest key
    position (cosine of the raw stage-3 vectors) has them as its nearest query position."""
    q = torch.nn.functional.normalize(query.flatten(1), dim=0)
    shares = []
    for key in keys:
        sim = q.T @ torch.nn.functional.normalize(key.flatten(1), dim=0)
        forward = sim.argmax(1)
        shares.append(float((sim.argmax(0)[forward] == torch.arange(len(forward))).float().mean()))
    return np.asarray(shares, dtype=np.float32)


def separation(bench, ranking, family: dict[str, str], k: int, score, qf: dict, gf: dict) -> None:
    """Prints one scorer's shortlist classes, AUCs, re-ranker-only and fused mAP."""
    from cvnet.retrieval import DEFAULT_WEIGHT, evaluate_rankings, rerank_probabilities, retrieve

    gt, queries, names = bench.gt, bench.query_ids, bench.ids
    p = rerank_probabilities(ranking, k, score, qf, gf)
    kinds: dict[str, list[tuple[float, float]]] = {"positive": [], "junk": [], "family": [], "other": []}
    for qi, query in enumerate(queries):
        entry = gt["gnd"][qi]
        positive = {names[i] for i in [*entry["easy"], *entry["hard"]]}
        junk = {names[i] for i in entry["junk"]}
        for j, candidate in enumerate(ranking.ids[qi, :k]):
            kind = ("positive" if candidate in positive else "junk" if candidate in junk
                    else "family" if family[candidate] == family[query] else "other")
            kinds[kind].append((float(ranking.scores[qi, j]), float(p[qi, j])))
    score_of = {kind: np.asarray(v, dtype=np.float64).reshape(-1, 2) for kind, v in kinds.items()}
    negative = np.concatenate([score_of["family"], score_of["other"]])
    fused = lambda s: s[:, 0] + DEFAULT_WEIGHT * s[:, 1]  # noqa: E731  (the ranking's fusion)
    positive = score_of["positive"]
    print("  shortlist: " + ", ".join(f"{len(v)} {kind}" for kind, v in score_of.items()))
    print("  mean p: " + ", ".join(f"{kind} {v[:, 1].mean():.3f}" for kind, v in score_of.items() if len(v)))
    print(f"  AUC positive vs negative: global {auc(positive[:, 0], negative[:, 0]):.3f}, "
          f"p {auc(positive[:, 1], negative[:, 1]):.3f} (vs family "
          f"{auc(positive[:, 1], score_of['family'][:, 1]):.3f}), fused "
          f"{auc(fused(positive), fused(negative)):.3f}")
    rankings = {"global": retrieve(ranking, k, None), "re-ranker-only": retrieve(ranking, k, score, qf, gf, weight=1e6),
                "fused": retrieve(ranking, k, score, qf, gf)}
    for label, rows in rankings.items():
        result = evaluate_rankings(rows, gt, queries)
        print(f"  {label} mAP E / M / H: " + " / ".join(f"{100 * result[x]['map']:.2f}"
                                                      for x in ("easy", "medium", "hard")), flush=True)


def report(label: str, model, synth: Path, k: int, training_free: bool) -> None:
    """``separation`` of ``model``'s re-ranker and, with ``training_free``, of the mutual
    nearest neighbours of its raw stage-3 maps (at its ``rerank_scale``)."""
    from cvnet.data.images import resize_for_scale
    from cvnet.data.revisitop import load_benchmark
    from cvnet.retrieval import benchmark_ranking, benchmark_rerank_features

    bench = load_benchmark(str(synth / "revisitop" / "roxsynth"))
    family = {r["id"]: r["family"] for r in csv.DictReader(open(synth / "synth_images.csv"))}
    with torch.inference_mode():
        ranking = benchmark_ranking(model.encoder_q, bench, (1.0,))
        print(f"{label}:")
        separation(bench, ranking, family, k, model.match_probability, *benchmark_rerank_features(model, bench))
        if training_free:
            stage3 = lambda im: model.feature_map_tensor(resize_for_scale(im, model.rerank_scale))  # noqa: E731
            maps = [{i: stage3(im) for i, im in zip(ids, images)}
                    for ids, images in ((bench.query_ids, bench.query_images), (bench.ids, bench.images))]
            print(f"{label}, mutual nearest neighbours of its stage-3 maps (training-free):")
            separation(bench, ranking, family, k, mutual_nn, *maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", required=True, help="a `cvnet synth` folder (its benchmark)")
    parser.add_argument("--start", required=True, help="the starting CVNet checkpoint (untrained re-ranker)")
    parser.add_argument("--trained", nargs="*", default=[], help="stage-2 checkpoint folders")
    parser.add_argument("--rerank-scale", type=float, default=2.0, help="the untrained re-ranker's scale")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--training-free", action="store_true",
                        help="also score the untrained model's shortlist by mutual nearest neighbours")
    args = parser.parse_args()

    from cvnet.models.checkpoints import load_model
    from pipelines.train_rerank import load_trained_model

    torch.set_num_threads(2)
    start = load_model(args.start)
    start.rerank_scale = args.rerank_scale
    report("untrained", start, Path(args.synth), args.k, args.training_free)
    for trained in args.trained:
        report(trained, load_trained_model(trained), Path(args.synth), args.k, False)


if __name__ == "__main__":
    main()

"""Does a re-ranker separate positives from negatives inside the global shortlist? For each
model: the global top-``k`` of every query on a synthetic benchmark, each candidate's class
(positive: easy or hard; junk; negative of the query's landmark family; other negative), and
the AUC of positives against negatives of the global cosine, the match probability ``p`` and
the fused score (0.5: no better than chance), plus the re-ranker-only mAP (``p`` alone orders
the shortlist). The mAP of a ranking mixes the shortlist's quality with the re-ranker's; the
AUC isolates the re-ranker.

    .venv/bin/python bench/rerank_separation.py --synth /tmp/rq/synth \\
        --start /tmp/rq/stage1-seed0.pth --trained <store>/checkpoints/<run>/step_00000200
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


def separation(model, synth: Path, k: int) -> None:
    """Prints one model's shortlist classes, AUCs and re-ranker-only mAP."""
    from cvnet.data.revisitop import load_benchmark
    from cvnet.retrieval import (
        DEFAULT_WEIGHT,
        benchmark_ranking,
        benchmark_rerank_features,
        evaluate_rankings,
        rerank_probabilities,
        retrieve,
    )

    bench = load_benchmark(str(synth / "revisitop" / "roxsynth"))
    gt, queries, names = bench.gt, bench.query_ids, bench.ids
    family = {r["id"]: r["family"] for r in csv.DictReader(open(synth / "synth_images.csv"))}
    with torch.inference_mode():
        ranking = benchmark_ranking(model.encoder_q, bench, (1.0,))
        qf, gf = benchmark_rerank_features(model, bench)
        p = rerank_probabilities(ranking, k, model.match_probability, qf, gf)
    kinds: dict[str, list[tuple[float, float]]] = {"positive": [], "junk": [], "family": [], "other": []}
    for qi, query in enumerate(queries):
        entry = gt["gnd"][qi]
        positive = {names[i] for i in [*entry["easy"], *entry["hard"]]}
        junk = {names[i] for i in entry["junk"]}
        for j, candidate in enumerate(ranking.ids[qi, :k]):
            kind = ("positive" if candidate in positive else "junk" if candidate in junk
                    else "family" if family[candidate] == family[query] else "other")
            kinds[kind].append((float(ranking.scores[qi, j]), float(p[qi, j])))
    score = {kind: np.asarray(v, dtype=np.float64).reshape(-1, 2) for kind, v in kinds.items()}
    negative = np.concatenate([score["family"], score["other"]])
    fused = lambda s: s[:, 0] + DEFAULT_WEIGHT * s[:, 1]  # noqa: E731  (the ranking's fusion)
    print("  shortlist: " + ", ".join(f"{len(v)} {kind}" for kind, v in score.items()))
    print("  mean p: " + ", ".join(f"{kind} {v[:, 1].mean():.3f}" for kind, v in score.items() if len(v)))
    print(f"  AUC positive vs negative: global {auc(score['positive'][:, 0], negative[:, 0]):.3f}, "
          f"p {auc(score['positive'][:, 1], negative[:, 1]):.3f} (vs family "
          f"{auc(score['positive'][:, 1], score['family'][:, 1]):.3f}), fused "
          f"{auc(fused(score['positive']), fused(negative)):.3f}")
    only = evaluate_rankings(retrieve(ranking, k, model.match_probability, qf, gf, weight=1e6), gt, queries)
    print("  re-ranker-only mAP E / M / H: " + " / ".join(f"{100 * only[x]['map']:.2f}"
                                                       for x in ("easy", "medium", "hard")), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", required=True, help="a `cvnet synth` folder (its benchmark)")
    parser.add_argument("--start", required=True, help="the starting CVNet checkpoint (untrained re-ranker)")
    parser.add_argument("--trained", nargs="*", default=[], help="stage-2 checkpoint folders")
    parser.add_argument("--rerank-scale", type=float, default=2.0, help="the untrained re-ranker's scale")
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()

    from cvnet.models.checkpoints import load_model
    from pipelines.train_rerank import load_trained_model

    torch.set_num_threads(2)
    start = load_model(args.start)
    start.rerank_scale = args.rerank_scale
    for label, model in [("untrained", start), *((t, load_trained_model(t)) for t in args.trained)]:
        print(f"{label}:")
        separation(model, Path(args.synth), args.k)


if __name__ == "__main__":
    main()

"""Offline re-ranking throughput: the released code's per-pair approach vs candidate-major vs cached.

For Q queries with a top-K shortlist each over a gallery of G distinct candidates (the queries
share candidates when K * Q > G), measured side by side in one process on the same model:

(a) released: per pair, the candidate's stage-3 map recomputed by the backbone, then the
    reference-structured pair (pyramid + convs per pair, full 4D correlation, layer-by-layer learner);
(b) recompute, candidate-major: each candidate's rerank features computed once (backbone + convs),
    then scored against all its queries in one batched call (cvnet.models.rerank.key_major_probability);
(c) cached: each candidate's stored features decoded from bytes (RerankFeatures.from_bytes; the
    table read itself is not timed), then the same batched scoring.

Per-image cost = backbone stage 3 + pyramid convs of one image; per-pair cost = one learner pair in
the batched path. Projections multiply measured per-image and per-pair costs (one process, the
threads given) by the counts: 70 queries x R1M (K pairs per query, no shared candidates: the worst
case), and all-vs-all on 1 M images (each image's features once, K pairs per image); global search
and I/O are not included (see bench/mine.py for the search). Default sizes are tiny for a shared
2-core machine; the issue's setting is ``--map 48x64 --k 100``.

Usage: python bench/rerank_pipeline.py [--map 12x16] [--k 4] [--queries 2] [--gallery 6] [--threads 1]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from timing import measure  # bench/timing.py
from cvnet.models.correlation import pyramid_sizes
from cvnet.models.cvnet import CVNet
from cvnet.models.rerank import LEVEL_CHANNELS, RerankFeatures, match_probability_reference
from cvnet.models.synthetic_weights import synthetic_state_dict
from cvnet.models.rerank import key_major_probability

R1M, QUERIES_R1M, ALL = 1_001_001, 70, 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--map", default="12x16", help="stage-3 map size HxW (image = 16x that)")
    parser.add_argument("--k", type=int, default=4, help="shortlist length per query")
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--gallery", type=int, default=6, help="distinct candidates the shortlists draw from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--released-pairs", type=int, default=None,
                        help="time (a) on only the first N pairs and scale it to all (default: every pair); "
                             "at 48x64 a pair of (a) takes seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.map.split("x"))
    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 0))
    model.eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16 * h, 16 * w, 3), dtype=np.uint8) for _ in range(args.gallery + args.queries)]
    gallery, query_images = images[: args.gallery], images[args.gallery:]
    shortlists = [rng.choice(args.gallery, size=min(args.k, args.gallery), replace=False) for _ in query_images]
    query_feats = [model.rerank_features(im) for im in query_images]
    query_maps = [model.feature_map_tensor(im) for im in query_images]
    stored = [model.rerank_features(im).to_bytes() for im in gallery]
    pairs = sum(len(s) for s in shortlists)
    needs = {g: [q for q, s in enumerate(shortlists) if g in s] for g in range(args.gallery)}
    needs = {g: qs for g, qs in needs.items() if qs}

    all_pairs = [(q, g) for q, s in enumerate(shortlists) for g in s]
    sampled = all_pairs[: args.released_pairs or pairs]

    def released():
        return [match_probability_reference(model.cv_learner, model.conv2ds, query_maps[q],
                                            model.feature_map_tensor(gallery[g])) for q, g in sampled]

    def scored(features_of):
        return {g: key_major_probability(model.cv_learner, features_of(g), [query_feats[q] for q in qs])
                for g, qs in needs.items()}

    with torch.no_grad():
        a = measure(released, 1)
        a.wall *= pairs / len(sampled)  # (a) scaled to every pair when sampled
        b = measure(lambda: scored(lambda g: model.rerank_features(gallery[g])), 1)
        c = measure(lambda: scored(lambda g: RerankFeatures.from_bytes(stored[g])), 1)
        image = measure(lambda: model.rerank_features(gallery[0]), 2).wall
        decode = measure(lambda: RerankFeatures.from_bytes(stored[0]), 3).wall
        pair = (c.wall - len(needs) * decode) / pairs
        reference_pair = a.wall / pairs - measure(lambda: model.feature_map_tensor(gallery[0]), 2).wall
    check = max(abs(a.result[i] - c.result[g][needs[g].index(q)]) for i, (q, g) in enumerate(sampled))
    positions = sum(ph * pw for ph, pw in pyramid_sizes(h, w))
    fp32 = LEVEL_CHANNELS * positions * 4
    print(f"maps {h}x{w} (images {16 * h}x{16 * w}), K={args.k}, {args.queries} queries, {len(needs)} distinct "
          f"candidates, {pairs} pairs, {args.threads} thread(s); (a) timed on {len(sampled)} of the pairs and "
          f"scaled; max |p(a) - p(c)| over those = {check:.1e}\n")
    print("| mode | queries/s | s per query | per-image cost (s) | per-pair cost (s) | speed-up vs (a) | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [("(a) released: per pair, map recomputed", a, image, reference_pair),
            ("(b) recompute, candidate-major", b, image, pair), ("(c) cached", c, decode, pair)]
    for name, m, per_image, per_pair in rows:
        print(f"| {name} | {args.queries / m.wall:.3f} | {m.wall / args.queries:.2f} | {per_image:.4f} | "
              f"{per_pair:.4f} | {a.wall / m.wall:.1f}x | {m.peak_mib:.0f} |")
    print(f"\nstored rerank features per gallery image for (c): {fp32 / 1e6:.2f} MB fp32, {fp32 / 2e6:.2f} MB fp16 "
          f"({positions} positions x {LEVEL_CHANNELS} channels; x {R1M:,} = {fp32 * R1M / 1e12:.1f} TB fp32, "
          f"{fp32 * R1M / 2e12:.1f} TB fp16)\n")
    k = args.k
    print(f"| projection (one process, {args.threads} thread(s), measured rates at {h}x{w}, K={k}) | (a) | (b) | (c) |")
    print("| --- | --- | --- | --- |")
    r1m = QUERIES_R1M * k
    cost = {"(a)": r1m * (image + reference_pair), "(b)": r1m * (image + pair), "(c)": r1m * (decode + pair)}
    print(f"| {QUERIES_R1M} queries x R1M ({r1m:,} pairs, no shared candidates) | "
          + " | ".join(f"{v / 3600:.2f} h" for v in cost.values()) + " |")
    everyone = ALL * k
    cost = {"(a)": everyone * (image + reference_pair), "(b)": ALL * image + everyone * pair,
            "(c)": ALL * decode + everyone * pair}
    print(f"| all-vs-all on 1 M images ({everyone:,} pairs, each image's features once) | "
          + " | ".join(f"{v / 86400:.1f} days" for v in cost.values()) + " |")


if __name__ == "__main__":
    main()

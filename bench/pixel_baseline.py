"""Raw-pixel baseline on the synthetic revisitop benchmark: downscaled pixels, cosine kNN.

Shows the benchmark is neither trivial nor random: learned descriptors and re-ranking must beat
the raw-pixel numbers (and the chance level of a random order, printed last), while a geometric reference (ORB matches verified by a RANSAC homography,
ranked by inlier count) shows the ground truth is consistent and solvable. Generates the default
collection (or reads ``--data``), then prints the revisitop Easy / Medium / Hard mAP.

    .venv/bin/python bench/pixel_baseline.py [--data DIR | --seed 0] [--sizes 8 16 32] [--no-orb]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from cvnet.data.revisitop import load_benchmark
from cvnet.data.synthetic import DEFAULT_NAME, generate
from cvnet.eval.revisitop import evaluate


def thumbnail_descriptor(image: np.ndarray, side: int) -> np.ndarray:
    """Downscale to side x side (area), zero-mean, unit-norm float32 vector."""
    small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    vec = (small - small.mean()).ravel()
    return vec / max(float(np.linalg.norm(vec)), 1e-12)


def load_images(root: Path) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """Ground truth, database images and cropped queries of a revisitop folder."""
    bench = load_benchmark(str(root))
    return bench.gt, bench.images, bench.query_images


def pixel_scores(db: list[np.ndarray], queries: list[np.ndarray], side: int) -> np.ndarray:
    """(n_db, n_q) cosine similarities of ``side``-pixel thumbnails."""
    d = np.stack([thumbnail_descriptor(im, side) for im in db])
    q = np.stack([thumbnail_descriptor(im, side) for im in queries])
    return d @ q.T


def orb_scores(db: list[np.ndarray], queries: list[np.ndarray]) -> np.ndarray:
    """(n_db, n_q) RANSAC-homography inlier counts of ratio-tested ORB matches."""
    orb, matcher = cv2.ORB_create(500), cv2.BFMatcher(cv2.NORM_HAMMING)

    def features(im: np.ndarray) -> tuple[list, np.ndarray | None]:
        return orb.detectAndCompute(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), None)

    dbf = [features(im) for im in db]
    scores = np.zeros((len(db), len(queries)))
    for qi, (kq, dq) in enumerate(features(im) for im in queries):
        for i, (kd, dd) in enumerate(dbf):
            if dq is None or dd is None or len(dd) < 2:
                continue
            good = [p[0] for p in matcher.knnMatch(dq, dd, k=2)
                    if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
            if len(good) < 8:
                continue
            src = np.float32([kq[m.queryIdx].pt for m in good])
            dst = np.float32([kd[m.trainIdx].pt for m in good])
            _, inliers = cv2.findHomography(src, dst, cv2.RANSAC, 5.0)
            scores[i, qi] = 0 if inliers is None else int(inliers.sum())
    return scores


def score_map(scores: np.ndarray, gt: dict) -> dict[str, dict[str, float]]:
    """revisitop scores of a similarity matrix (higher is better)."""
    return evaluate(np.argsort(-scores, axis=0, kind="stable"), gt)


def chance_map(gt: dict, n_db: int, draws: int = 20, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean revisitop scores of ``draws`` uniformly random orders of the database: chance level."""
    rng = np.random.default_rng(seed)
    runs = [evaluate(np.stack([rng.permutation(n_db) for _ in gt["gnd"]], axis=1), gt)
            for _ in range(draws)]
    return {p: {key: float(np.mean([r[p][key] for r in runs])) for key in runs[0][p]} for p in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an existing `cvnet synth` output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed when generating")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--no-orb", action="store_true", help="skip the ORB + RANSAC reference")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "synth"
        if not args.data:
            start = time.perf_counter()
            summary = generate(str(data), seed=args.seed)
            print(f"generated {summary.counts['images']} images in "
                  f"{time.perf_counter() - start:.1f} s (seed {args.seed})")
        name = DEFAULT_NAME if not args.data else next((data / "revisitop").iterdir()).name
        gt, db, queries = load_images(data / "revisitop" / name)
        labels = {k: sum(len(e[k]) for e in gt["gnd"]) / len(gt["gnd"]) for k in ("easy", "hard", "junk")}
        print(f"{len(queries)} queries, {len(db)} database images; per query: "
              + ", ".join(f"{v:.1f} {k}" for k, v in labels.items()))
        print("| method | Easy mAP | Medium mAP | Hard mAP | seconds |")
        print("| --- | --- | --- | --- | --- |")
        methods = [(f"pixels {s}x{s}, cosine kNN", lambda s=s: pixel_scores(db, queries, s))
                   for s in args.sizes]
        if not args.no_orb:
            methods.append(("ORB + RANSAC inliers (reference)", lambda: orb_scores(db, queries)))
        methods.append(("random order (chance, mean of 20)", None))
        for label, method in methods:
            start = time.perf_counter()
            r = chance_map(gt, len(db)) if method is None else score_map(method(), gt)
            print(f"| {label} | {100 * r['easy']['map']:.2f} | {100 * r['medium']['map']:.2f} | "
                  f"{100 * r['hard']['map']:.2f} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()

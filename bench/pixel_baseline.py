"""Raw-pixel baseline on the synthetic revisitop benchmark: downscaled pixels, cosine kNN.

Shows the benchmark is neither trivial nor random: learned descriptors and re-ranking must beat
these numbers. Generates the default collection (or reads ``--data``), then prints the revisitop
Easy / Medium / Hard mAP for a few thumbnail sizes.

    .venv/bin/python bench/pixel_baseline.py [--data DIR | --seed 0] [--sizes 8 16 32]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from cvnet.data.images import crop_query, decode_image
from cvnet.data.revisitop import load_ground_truth
from cvnet.data.synthetic import DEFAULT_NAME, generate
from cvnet.eval.revisitop import evaluate


def thumbnail_descriptor(image: np.ndarray, side: int) -> np.ndarray:
    """Downscale to side x side (area), zero-mean, unit-norm float32 vector."""
    small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    vec = (small - small.mean()).ravel()
    return vec / max(float(np.linalg.norm(vec)), 1e-12)


def pixel_map(root: Path, name: str, side: int) -> dict[str, dict[str, float]]:
    """revisitop scores of cosine kNN over ``side``-pixel thumbnails (queries cropped to bbx)."""
    gt = load_ground_truth(str(root / f"gnd_{name}.pkl"))

    def read(n: str) -> np.ndarray:
        path = root / "jpg" / f"{n}.jpg"
        return decode_image(path.read_bytes(), str(path))

    db = np.stack([thumbnail_descriptor(read(n), side) for n in gt["imlist"]])
    q = np.stack([thumbnail_descriptor(crop_query(read(n), e["bbx"]), side)
                  for n, e in zip(gt["qimlist"], gt["gnd"])])
    ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")
    return evaluate(ranks, gt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an existing `cvnet synth` output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed when generating")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "synth"
        if not args.data:
            start = time.perf_counter()
            summary = generate(str(data), seed=args.seed)
            print(f"generated {summary.counts['images']} images in "
                  f"{time.perf_counter() - start:.1f} s (seed {args.seed})")
        name = DEFAULT_NAME if not args.data else next((data / "revisitop").iterdir()).name
        print("| thumbnail | Easy mAP | Medium mAP | Hard mAP |")
        print("| --- | --- | --- | --- |")
        for side in args.sizes:
            r = pixel_map(data / "revisitop" / name, name, side)
            print(f"| {side}x{side} | {100 * r['easy']['map']:.2f} | "
                  f"{100 * r['medium']['map']:.2f} | {100 * r['hard']['map']:.2f} |")


if __name__ == "__main__":
    main()

"""``cvnet synth``: write a synthetic landmark collection (GLDv2 training set + revisitop benchmark)."""
from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import entrypoint

HELP = "generate a synthetic landmark collection in the GLDv2 and revisitop formats"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``cvnet synth``; defaults give about 2,000 images at 256 px."""
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes")
    parser.add_argument("--landmarks", type=int, default=100, help="training landmarks")
    parser.add_argument("--images-per-landmark", type=int, default=12,
                        help="training images per landmark (benchmark: 3x as many per landmark)")
    parser.add_argument("--queries", type=int, default=50, help="benchmark queries (5 per landmark)")
    parser.add_argument("--distractors", type=int, default=350, help="extra database images")
    parser.add_argument("--size", type=int, default=256, help="long side of the images, pixels")
    parser.add_argument("--name", default="roxsynth", help="revisitop dataset name")
    parser.add_argument("--distractor-set", type=int, default=None, metavar="N",
                        help="instead: write N synthetic distractor images + distractors.parquet (R1M-style, "
                             "for cvnet evaluate --distractors; same --seed as the benchmark for look-alikes)")


def run(args: argparse.Namespace) -> int:
    """Generate the collection (or a distractor set) and print its summary as JSON."""
    from cvnet.data.synthetic import generate

    if args.distractor_set is not None:
        from cvnet.data.synthetic_distractors import generate_distractors

        manifest = generate_distractors(args.out, args.distractor_set, seed=args.seed, size=args.size)
        print(json.dumps({"out": args.out, "manifest": manifest, "distractors": args.distractor_set}))
        return 0

    summary = generate(args.out, seed=args.seed, landmarks=args.landmarks,
                       images_per_landmark=args.images_per_landmark, queries=args.queries,
                       distractors=args.distractors, size=args.size, name=args.name)
    print(json.dumps({"out": summary.out, **summary.to_json()}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint("jobs.synth"))

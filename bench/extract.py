"""Global-descriptor extraction speed: CVNet.global_descriptor (3 scales) at 1024x768, per mode.

Modes: fp32 contiguous, fp32 + channels_last (what ``load_model`` returns: exact within
1e-7), bf16 autocast, bf16 + channels_last (``precision="bf16"``: approximate, opt-in).
Each row: images per second (best of --repeats calls over --images same-size images, which
run as one batch per scale), CPU seconds per image (the machine may be shared: wall time
then overstates the cost), peak memory of the timed call (the process's peak RSS, model
included, on the CPU; torch.cuda.max_memory_allocated on CUDA) and the descriptor error
against fp32 (max abs difference, lowest cosine). Weights are synthetic (R50, seed 0), images random but smooth.
Usage: python bench/extract.py [--images 2] [--size 1024x768] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

import cvnet
from cvnet.models.synthetic_weights import synthetic_state_dict
from timing import measure

MODES = (("fp32", "fp32", False), ("fp32 channels_last", "fp32", True),
         ("bf16 autocast", "bf16", False), ("bf16 channels_last", "bf16", True))


def make_images(n: int, width: int, height: int) -> list[np.ndarray]:
    """Smooth random BGR uint8 images (blurred noise), deterministic."""
    rng = np.random.default_rng(0)
    return [cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 3)
            for _ in range(n)]


def run_mode(model: cvnet.CVNet, images: list[np.ndarray], precision: str, channels_last: bool,
             args: argparse.Namespace) -> tuple[np.ndarray, float, float, float]:
    """(descriptors, best wall s, best CPU s per call, peak MiB) of one mode."""
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    call = lambda: model.global_descriptor(images, batch_size=len(images), precision=precision)  # noqa: E731
    model.global_descriptor(images[:1], precision=precision)  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run = measure(call, args.repeats, trim_heap=True)
    desc, seconds, cpu, rss = run.result, run.wall, run.cpu, run.peak_mib
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else rss
    return desc, seconds, cpu, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="images per timed call")
    parser.add_argument("--size", default="1024x768", help="image width x height")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, height = (int(x) for x in args.size.split("x"))
    images = make_images(args.images, width, height)
    model = cvnet.load_model(synthetic_state_dict("r50", seed=0), device=args.device)

    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads, "
          f"{args.images} images of {width}x{height}, scales 0.7071/1/1.4142, best of {args.repeats}")
    print("| mode | images / s | s / image | CPU s / image | x fp32 | peak MiB | max abs diff vs fp32 "
          "| min cosine vs fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    reference, ref_seconds = None, None
    for label, precision, channels_last in MODES:
        desc, seconds, cpu, peak = run_mode(model, images, precision, channels_last, args)
        if reference is None:
            reference, ref_seconds = desc, seconds
        diff = float(np.abs(desc - reference).max())
        cosine = float((desc * reference).sum(axis=1).min())
        print(f"| {label} | {args.images / seconds:.3f} | {seconds / args.images:.2f} | {cpu / args.images:.2f} | "
              f"{ref_seconds / seconds:.2f} | {peak:.0f} | {diff:.1e} | {cosine:.6f} |")


if __name__ == "__main__":
    main()

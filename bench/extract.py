"""Global-descriptor extraction speed: CVNet.global_descriptor (3 scales) at 1024x768, per mode.

Modes: (a) fp32 with BatchNorm unfolded (the global network as trained; the baseline),
(b) fp32 with BatchNorm folded into the convs (what ``global_descriptor`` runs: exact),
(c) bf16 autocast on (b) (``precision="bf16"``: approximate, opt-in). All run channels_last
(what ``load_model`` returns), each under glibc's default heap and under cvnet's heap reuse
(``cvnet.models.heap``, the default of every model call; CPU only). Each row: images per
second (best of --repeats calls over --images same-size images, which run in batches of
--batch-sizes per scale), CPU seconds per image (the machine may be shared: wall time then
overstates the cost), "x released" = the released CVNet code's s / image on this machine
(``--released-s``; without it, estimated as ``--released-vs-a`` times (a) under the default
heap: 6.34 / 5.75 = 1.10 on the issue's machine, where our (a) then ran 5.75 s) / s per image,
peak memory of the timed call (the process's peak RSS, model included, on the CPU;
torch.cuda.max_memory_allocated on CUDA) and the descriptor error against (a) (max abs
difference, lowest cosine). Weights are synthetic (R50, seed 0), images random but smooth.
Usage: python bench/extract.py [--images 2] [--threads 1,2] [--batch-sizes 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import itertools

import cv2
import numpy as np
import torch

import cvnet
from cvnet.models.global_net import multiscale_descriptors
from cvnet.models.precision import precision_context
from cvnet.models.synthetic_weights import synthetic_state_dict
from timing import HEAPS, heap_policy, machine_load, measure

MODES = (("(a) fp32, BN unfolded", "fp32", False), ("(b) fp32, BN folded", "fp32", True),
         ("(c) bf16, BN folded", "bf16", True))


def make_images(n: int, width: int, height: int) -> list[np.ndarray]:
    """Smooth random BGR uint8 images (blurred noise), deterministic."""
    rng = np.random.default_rng(0)
    return [cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 3)
            for _ in range(n)]


def describe(model: cvnet.CVNet, images: list[np.ndarray], precision: str, folded: bool,
             batch_size: int) -> np.ndarray:
    if folded:
        return model.global_descriptor(images, batch_size=batch_size, precision=precision)
    with torch.no_grad(), precision_context(model.device, precision):
        return multiscale_descriptors(model.encoder_q, images, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="images per timed call")
    parser.add_argument("--size", default="1024x768", help="image width x height")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many calls (the first maps new memory)")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, one table block each")
    parser.add_argument("--batch-sizes", default=None, help="images per batch (default: --images)")
    parser.add_argument("--released-s", type=float, default=None, help="released code's s / image on this machine")
    parser.add_argument("--released-vs-a", type=float, default=6.34 / 5.75,
                        help="without --released-s: released code's time / (a)'s under the default heap")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    images = make_images(args.images, width, height)
    model = cvnet.load_model(synthetic_state_dict("r50", seed=0), device=args.device)
    cuda = args.device == "cuda"

    heaps = HEAPS if args.device == "cpu" else ("heap reuse",)
    released = f"{args.released_s} s / image" if args.released_s else f"{args.released_vs_a:.2f} x (a), default heap"
    print(f"torch {torch.__version__}, device {args.device}, {args.images} images of {width}x{height}, "
          f"scales 0.7071/1/1.4142, best of {args.repeats}; released code: {released}; {machine_load()}")
    print("| threads | batch | mode | heap | images / s | s / image | CPU s / image | x (a) | x released | peak MiB "
          "| max abs diff vs (a) | min cosine vs (a) |")
    print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    threads = [int(x) for x in args.threads.split(",")]
    batches = [int(x) for x in (args.batch_sizes or str(args.images)).split(",")]
    for n_threads, batch in itertools.product(threads, batches):
        torch.set_num_threads(n_threads)
        reference, ref_seconds, released_s = None, None, args.released_s
        for (label, precision, folded), heap in itertools.product(MODES, heaps):
            describe(model, images[:1], precision, folded, 1)  # warm-up (and the folded copy, built once)
            with heap_policy(heap):
                run = measure(lambda: describe(model, images, precision, folded, batch), args.repeats,
                              trim_heap=True, cuda=cuda)
            desc, seconds = run.result, run.wall / args.images
            if reference is None:
                reference, ref_seconds = desc, seconds
                released_s = released_s or args.released_vs_a * seconds
            diff = float(np.abs(desc - reference).max())
            cosine = float((desc * reference).sum(axis=1).min())
            peak = run.gpu_peak_mib if cuda else run.peak_mib
            print(f"| {n_threads} | {batch} | {label} | {heap} | {1 / seconds:.3f} | {seconds:.2f} | "
                  f"{run.cpu / args.images:.2f} | {ref_seconds / seconds:.2f} | {released_s / seconds:.2f} | "
                  f"{peak:.0f} | {diff:.1e} | {cosine:.6f} |")
    print(f"\nafter the run: {machine_load()}")


if __name__ == "__main__":
    main()

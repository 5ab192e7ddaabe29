"""Each exact change to extraction measured on its own, side by side (heap reuse on, as in every model call).

Rows: the unfolded network with the residual add out of place (as before) vs in place; the
BatchNorm-folded copy with its blocks' ReLUs and residual adds as separate passes vs fused into
the convs (oneDNN post-ops). Each row: best of --repeats calls over --images 1024x768 images,
3 scales; rounds interleave the rows so that drift in the machine's speed hits all of them.
Usage: python bench/extract_changes.py [--threads 2] [--rounds 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from extract import describe, make_images
from timing import machine_load, measure

import cvnet
from cvnet.models import resnet
from cvnet.models.synthetic_weights import synthetic_state_dict


def add_out_of_place(self: resnet.ResBlock, x: torch.Tensor) -> torch.Tensor:
    shortcut = self.bn(self.proj(x)) if self.proj_block else x
    return self.f(x) + shortcut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = cvnet.load_model(synthetic_state_dict("r50", seed=0), device="cpu")
    images = make_images(args.images, 1024, 768)
    in_place = resnet.ResBlock.pre_activation

    def unfolded(pre_activation: Callable) -> Callable[[], object]:
        def run() -> object:
            resnet.ResBlock.pre_activation = pre_activation
            return describe(model, images, "fp32", False, args.images)
        return run

    def folded(fuse: bool) -> Callable[[], object]:
        def run() -> object:
            for block in model.inference_encoder().modules():
                if isinstance(block, resnet.ResBlock):
                    block.fuse_pointwise = fuse
            return describe(model, images, "fp32", True, args.images)
        return run

    rows = {"unfolded, residual add out of place": unfolded(add_out_of_place),
            "unfolded, residual add in place": unfolded(in_place),
            "BN folded, ReLU / add as separate passes": folded(False),
            "BN folded, ReLU / add fused into the convs": folded(True)}
    best = {name: float("inf") for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            run()  # warm-up: the shapes' memory
            best[name] = min(best[name], measure(run, args.repeats).wall / args.images)
    resnet.ResBlock.pre_activation = in_place
    print(f"torch {torch.__version__}, {args.threads} threads, {args.images} images of 1024x768, 3 scales; "
          f"{machine_load()}")
    print("| change | s / image | x previous row |\n| --- | ---: | ---: |")
    previous = None
    for name, seconds in best.items():
        ratio = f"{previous / seconds:.3f}" if previous else "-"
        print(f"| {name} | {seconds:.2f} | {ratio} |")
        previous = seconds


if __name__ == "__main__":
    main()

"""Training throughput with the old synchronous loading (decode + augment inside the step) vs
the prefetching loader (:func:`cvnet.training.data.prefetch_batches`, loader processes making
the next batches while the step runs): stage-1 images/s and stage-2 pairs/s, one training
process (no Ray, the same step functions as the workers), measured side by side in one run.

    .venv/bin/python bench/train.py --steps 12 --loader-workers 1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stage1(root: str, args: argparse.Namespace):
    """(make_batch, step function, items per batch) of stage 1 (demo settings, frozen stem..s3)."""
    from cvnet.config import TrainGlobalConfig, load_config
    from cvnet.data.manifest import read_image_bytes
    from cvnet.training.data import BatchLoader, Stage1Batches, load_train_set
    from cvnet.training.steps import build_global_net, build_stage1, set_train_mode, train_step

    cfg = load_config(TrainGlobalConfig, ROOT / "configs" / "demo.yaml",
                      [f"data.image_size={args.stage1_size}", "loss.queue_size=256"])
    ts = load_train_set(root, "train_clean")
    state, frozen = build_stage1(build_global_net(50, 0), ts.num_classes, cfg.loss.model_dump(),
                                 cfg.optim.model_dump(), cfg.model.freeze_stages)
    set_train_mode(state.model, frozen)
    loader = BatchLoader(ts, cfg.data.image_size, tuple(cfg.data.crop_scale), True, read_image_bytes)
    make = Stage1Batches(loader, cfg.optim.batch_size, 0, 1, 0, "uniform")
    step = lambda b: train_step(state, b.queries, b.keys, b.labels, 0.5, 0.5)  # noqa: E731
    return make, step, lambda b: len(b.labels)


def stage2(root: str, args: argparse.Namespace):
    """(make_batch, step function, pairs per batch) of stage 2 (demo settings, random negatives)."""
    from cvnet.config import TrainRerankConfig, load_config
    from cvnet.data.manifest import read_image_bytes
    from cvnet.training.data import BatchLoader, load_train_set
    from cvnet.training.rerank_data import RerankBatches, pair_maps
    from cvnet.training.rerank_step import freeze_backbone
    from pipelines.train_rerank import (build_rerank, curriculum, initial_model, pair_sampler,
                                        train_step)

    cfg = load_config(TrainRerankConfig, ROOT / "configs" / "rerank-demo.yaml",
                      [f"data.root={root}", f"data.image_size={args.stage2_size}"]).model_dump()
    ts = load_train_set(root, "train_clean")
    model = initial_model(cfg["model"])
    backbone = freeze_backbone(model)
    state = build_rerank(model, cfg["optim"])
    loader = BatchLoader(ts, cfg["data"]["image_size"], tuple(cfg["data"]["crop_scale"]), True,
                         read_image_bytes)
    make = RerankBatches(pair_sampler(cfg, ts), loader, curriculum(cfg), cfg["optim"]["batch_size"],
                         0, 1, 0)
    step = lambda b: train_step(state, pair_maps(backbone, b, "cpu").hidden(b.has_prob, [0, b.step], grid=4), b)  # noqa: E731
    return make, step, lambda b: len(b.pairs.keys)


def throughput(make, step, count, steps: int, workers: int) -> float:
    """Items per second over ``steps`` steps after one warm-up step (loader start-up excluded)."""
    from cvnet.training.data import prefetch_batches

    stream = prefetch_batches(make, 0, steps + 1, workers)
    step(next(stream))
    tic, items = time.perf_counter(), 0
    for batch in stream:
        step(batch)
        items += count(batch)
    return items / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--stage1-size", type=int, default=128)
    parser.add_argument("--stage2-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cvnet.data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, seed=0, landmarks=20, images_per_landmark=6, queries=5, distractors=0, size=512)
        root = str(Path(tmp) / "gldv2")
        rows = []
        for name, unit, build in (("stage 1", "images/s", stage1), ("stage 2", "pairs/s", stage2)):
            make, step, count = build(root, args)
            best = {0: 0.0, args.loader_workers: 0.0}
            for _ in range(args.repeats):  # alternated, best of each: the machine is shared
                for workers in best:
                    best[workers] = max(best[workers], throughput(make, step, count, args.steps, workers))
            rows.append((name, unit, best[0], best[args.loader_workers]))
    print(f"\n{args.steps} steps (best of {args.repeats}, alternated), torch threads {args.threads}, {args.loader_workers} loader "
          f"process(es), 512-px JPEGs; stage 1 at {args.stage1_size} px (demo config, batch 16), "
          f"stage 2 at {args.stage2_size} px (demo config, 4 anchors x 2 pairs)\n")
    print("| stage | unit | synchronous (baseline) | prefetching | ratio |\n| --- | --- | --- | --- | --- |")
    for name, unit, sync, ahead in rows:
        print(f"| {name} | {unit} | {sync:.1f} | {ahead:.1f} | {ahead / sync:.2f}x |")


if __name__ == "__main__":
    main()

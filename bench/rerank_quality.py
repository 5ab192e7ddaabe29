"""Does stage 2 work? Trained re-ranker vs global retrieval vs the untrained re-ranker on the
synthetic benchmark at demo scale (100 training landmarks, 128 px images; 60 queries of
12 landmarks instead of the demo's 20 of 4), 2 DDP workers, and an ablation (no hard negatives /
no Hide-and-Seek / no curriculum / all), all with the recipe of ``configs/rerank-synthetic.yaml``
(its crop size and ``model.rerank_scale``: the untrained re-ranker is evaluated at the same scale
as the trained ones).

Steps: the synthetic collection (cached in ``--work``); the starting CVNet: ``--init`` (a stage-1
export such as ``<store>/models/demo-stage1/cvnet_global.pth``; default a seeded random init), or
with ``--stage1-seeds S ...`` a fresh stage 1 per seed (``configs/demo.yaml`` with
``model.freeze_stages=2``), each measured on its own and summarised over the seeds (the margins
move with the stage-1 run); hard negatives mined on the start's global descriptors with
:func:`cvnet.search.search` (same landmark and self excluded, top-10) and committed with
:mod:`cvnet.tables`; one ``cvnet train-rerank`` run per recipe (``--steps``, the curriculum's
ramps scaled to them); each model evaluated on the benchmark's global top-``k`` (raw top-k
shortlist). Prints Markdown tables of Easy / Medium / Hard mAP. Every result is cached in
``--work``: a rerun continues where it stopped.

    .venv/bin/python bench/rerank_quality.py --work /tmp/rq --stage1-seeds 0 1 2 --recipes all
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYNTH = {"seed": 0, "landmarks": 100, "images_per_landmark": 12, "queries": 60,
         "distractors": 60, "size": 128}  # 12 benchmark landmarks (the demo's 20 queries: 4)
CONFIG = ROOT / "configs" / "rerank-synthetic.yaml"
STAGE1 = ROOT / "configs" / "demo.yaml"
RECIPES = ("all", "no hard negatives", "no HaS", "no curriculum")


def recipes(cfg) -> dict[str, list[str]]:
    """Overrides of the demo config per ablation, against the full recipe ("all"); "no
    curriculum" holds both values at their final level from the first step."""
    constant = [f"curriculum.{key}.{field}={value}" for key in ("hard_share", "has_prob")
                for field, value in (("start", getattr(cfg.curriculum, key).end),
                                     ("warmup_steps", 0), ("ramp_steps", 0))]
    return dict(zip(RECIPES, ([], ["negatives.table=null"],
                              ["curriculum.has_prob.start=0", "curriculum.has_prob.end=0"], constant)))


def mine_negatives(model, gldv2: str, uri: str, top_k: int = 10) -> int:
    """Top-``top_k`` other-landmark neighbours of every training image by ``model``'s global
    descriptor, committed as a hard-negatives table at ``uri``; returns its version."""
    from cvnet import tables
    from cvnet.data.images import decode_image
    from cvnet.data.manifest import read_image_bytes
    from cvnet.models.global_net import multiscale_descriptors
    from cvnet.search import Descriptors, search
    from cvnet.training.data import load_train_set

    ts = load_train_set(gldv2, "train_clean")
    images = [decode_image(read_image_bytes(u), i) for u, i in zip(ts.uris, ts.image_ids)]
    found = Descriptors(multiscale_descriptors(model.encoder_q, images, (1.0,)), ts.image_ids,
                        ts.landmark_ids[ts.labels])
    top = search(found, found, top_k)
    rows = pa.table({"image_id": ts.image_ids, "landmark_id": ts.landmark_ids[ts.labels],
                     "negative_ids": top.ids.tolist(), "negative_scores": top.scores.tolist()})
    table = tables.open_or_create(uri, rows.schema, "hard_negatives", "image_id", {"top_k": top_k})
    writer = tables.TableWriter(table, None)
    return writer.commit(tables.write_table_fragments(uri, rows), ts.image_ids, "mined")


def cached(path: Path, compute):
    """``compute()``'s JSON result, kept at ``path`` (a rerun of the script reuses it)."""
    if not path.exists():
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def row(name: str, res: dict) -> None:
    print(f"| {name} | " + " | ".join(f"{100 * res[p]['map']:.2f}" for p in ("easy", "medium", "hard"))
          + " |", flush=True)


def stage1(work: Path, gldv2: Path, seed: int) -> str:
    """A fresh stage 1 under ``seed`` (``configs/demo.yaml``, ``model.freeze_stages=2``, on the
    benchmark's training split, sampling and init seeded alike), exported once; its path."""
    from cvnet.config import TrainGlobalConfig, load_config
    from pipelines.train_global import export_global, fit_stage1, load_trained_net

    uri = work / f"stage1-seed{seed}.pth"
    if not uri.exists():
        cfg = load_config(TrainGlobalConfig, STAGE1, [
            f"name=quality-stage1-seed{seed}", f"store={work / 'store'}", f"data.root={gldv2}",
            "model.freeze_stages=2", f"seed={seed}", f"model.init_seed={seed}"])
        result = fit_stage1(cfg.model_dump())
        export_global(load_trained_net(result.checkpoint_path), str(uri), {"seed": seed})
    return str(uri)


def measure(init: str, out: Path, synth: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Each recipe trained from ``init`` and evaluated, then global retrieval and the untrained
    re-ranker; prints the table as it goes and returns its rows (per-protocol results)."""
    from cvnet.config import TrainRerankConfig, load_config
    from cvnet.models.checkpoints import load_model
    from cvnet.retrieval import evaluate_rerank
    from pipelines.train_rerank import fit_stage2, load_trained_model, pin_negatives

    demo = load_config(TrainRerankConfig, CONFIG)
    steps = args.steps or demo.optim.max_steps
    bench = str(synth / "revisitop" / "roxsynth")
    out.mkdir(parents=True, exist_ok=True)
    start = load_model(init)
    start.rerank_scale = demo.model.rerank_scale or start.rerank_scale  # the untrained, at the trained scale
    negatives = str(out / "hard_negatives.lance")
    if not os.path.exists(negatives):
        mine_negatives(start, str(synth / "gldv2"), negatives)
    print(f"\n{init}: {SYNTH['queries']} queries, 2 DDP workers, {steps} steps, "
          f"{demo.data.image_size} px crops, rerank_scale {start.rerank_scale}, global top-{args.k} "
          f"re-ranked (raw top-k shortlist), fused global + 0.5 p\n")
    print("| model | Easy mAP | Medium mAP | Hard mAP |\n| --- | --- | --- | --- |", flush=True)
    rows = {}
    ablations = recipes(demo)
    for recipe in args.recipes:
        tic = time.monotonic()
        name = re.sub(r"[^\w.]+", "-", " ".join(["quality", recipe, str(steps), *args.overrides]))
        scaled = [f"curriculum.{key}.{field}="
                  f"{getattr(getattr(demo.curriculum, key), field) * steps // demo.optim.max_steps}"
                  for key in ("hard_share", "has_prob") for field in ("warmup_steps", "ramp_steps")]
        cfg = load_config(TrainRerankConfig, CONFIG, [
            f"name={out.name}-{name}", f"store={out.parent / 'store'}",
            f"data.root={synth / 'gldv2'}", f"model.init={init}", f"negatives.table={negatives}",
            f"optim.max_steps={steps}", *scaled, *args.overrides, *ablations[recipe]])

        def trained_results():
            result = fit_stage2(pin_negatives(cfg.model_dump()))
            return evaluate_rerank(load_trained_model(result.checkpoint_path), bench, k=args.k,
                                   scales=(1.0,), rules=("topk",))

        rows[f"trained: {recipe}"] = cached(out / f"{name}.json", trained_results)["rerank_topk"]
        row(f"trained: {recipe} ({time.monotonic() - tic:.0f} s)", rows[f"trained: {recipe}"])
    base = cached(out / "baseline.json",  # last: the trained rows come first on a busy machine
                  lambda: evaluate_rerank(start, bench, k=args.k, scales=(1.0,), rules=("topk",)))
    rows.update({"global": base["global"], "untrained re-ranker": base["rerank_topk"]})
    for name in ("global", "untrained re-ranker"):
        row(name, rows[name])
    return rows


def references(synth: Path) -> None:
    """The reference rows of ``bench/pixel_baseline.py`` on this benchmark: 8x8-pixel
    thumbnails by cosine, and a random order (chance)."""
    from bench.pixel_baseline import chance_map, load_images, pixel_scores, score_map

    gt, db, queries = load_images(synth / "revisitop" / "roxsynth")
    print("\nreferences on this benchmark\n\n| model | Easy mAP | Medium mAP | Hard mAP |\n| --- | --- | --- | --- |")
    row("pixels 8x8, cosine kNN", score_map(pixel_scores(db, queries, 8), gt))
    row("random order (chance)", chance_map(gt, len(db)))


def summarize(runs: list[dict[str, dict]]) -> None:
    """Mean and spread of every row over the stage-1 runs, and each trained row's margin over
    global retrieval and the untrained re-ranker (mean, and the worst run)."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    protocols = ("easy", "medium", "hard")
    print(f"\nover {len(runs)} stage-1 runs: mean (min - max) mAP\n")
    print("| model | Easy mAP | Medium mAP | Hard mAP |\n| --- | --- | --- | --- |")
    for name in runs[0]:
        values = [[100 * run[name][p]["map"] for run in runs] for p in protocols]
        print(f"| {name} | " + " | ".join(f"{mean(v):.2f} ({min(v):.2f} - {max(v):.2f})"
                                          for v in values) + " |")
    print("\nmargin of each trained row, mean (worst run), mAP points\n")
    print("| model | over global: Medium | Hard | over untrained: Medium | Hard |\n"
          "| --- | --- | --- | --- | --- |")
    for name in (n for n in runs[0] if n.startswith("trained")):
        cells = [[100 * (run[name][p]["map"] - run[base][p]["map"]) for run in runs]
                 for base in ("global", "untrained re-ranker") for p in ("medium", "hard")]
        print(f"| {name} | " + " | ".join(f"{mean(c):+.2f} ({min(c):+.2f})" for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/cvnet-rerank-quality")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--init", default=None, help="starting CVNet checkpoint (default: random)")
    group.add_argument("--stage1-seeds", type=int, nargs="+", default=None,
                       help="train a fresh stage 1 per seed and start each from it")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's optim.max_steps")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the config for every recipe (e.g. data.perspective=0.2)")
    args = parser.parse_args()

    from cvnet.data.synthetic import generate
    from cvnet.models.checkpoints import save_checkpoint
    from pipelines.train_rerank import initial_model

    started = time.monotonic()
    work = Path(args.work)
    synth = work / "synth"
    if not (synth / "synth.json").exists():
        generate(str(synth), **SYNTH)
    if args.stage1_seeds is not None:
        inits = {f"seed{seed}": stage1(work, synth / "gldv2", seed) for seed in args.stage1_seeds}
    else:
        inits = {"init": args.init or str(work / "cvnet_init.pth")}
        if not os.path.exists(inits["init"]):
            save_checkpoint(initial_model({"init": None, "init_seed": 0, "depth": 50}),
                            inits["init"], {"stage": "random"})
    print(f"[quality] data and starting models ready ({time.monotonic() - started:.0f} s)", flush=True)
    references(synth)
    runs = [measure(init, work / label, synth, args) for label, init in inits.items()]
    if len(runs) > 1:
        summarize(runs)
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

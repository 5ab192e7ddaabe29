"""Does stage 2 work? Trained re-ranker vs global retrieval vs the untrained re-ranker on the
synthetic benchmark at demo scale (the demo's collection, 128 px images), 2 DDP workers, and an
ablation (no hard negatives / no Hide-and-Seek / no curriculum / all), all with the recipe of
``configs/rerank-synthetic.yaml`` (its crop size and ``model.rerank_scale``: the untrained re-ranker
is evaluated at the same scale as the trained ones).

Steps: the demo's synthetic collection (cached in ``--work``); the starting CVNet (``--init``: a
stage-1 export such as ``<store>/models/demo-stage1/cvnet_global.pth``; default a seeded random
init, exported once); hard negatives mined on its global descriptors with
:func:`cvnet.search.search` (same landmark and self excluded, top-10) and committed with
:mod:`cvnet.tables`; one ``cvnet train-rerank`` run per recipe (``--steps``, the curriculum's
ramps scaled to them); each model evaluated on the benchmark's global top-``k`` (raw top-k
shortlist). Prints a Markdown table of Easy / Medium / Hard mAP.

    .venv/bin/python bench/rerank_quality.py --work /tmp/rq --init <stage-1 export>
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

SYNTH = {"seed": 0, "landmarks": 100, "images_per_landmark": 12, "queries": 20,
         "distractors": 60, "size": 128}
CONFIG = ROOT / "configs" / "rerank-synthetic.yaml"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/cvnet-rerank-quality")
    parser.add_argument("--init", default=None, help="starting CVNet checkpoint (default: random)")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's optim.max_steps")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the config for every recipe (e.g. data.perspective=0.2)")
    args = parser.parse_args()

    from cvnet.config import TrainRerankConfig, load_config
    from cvnet.data.synthetic import generate
    from cvnet.models.checkpoints import load_model, save_checkpoint
    from cvnet.retrieval import evaluate_rerank
    from pipelines.train_rerank import fit_stage2, initial_model, load_trained_model, pin_negatives

    demo = load_config(TrainRerankConfig, CONFIG)
    steps = args.steps or demo.optim.max_steps
    ablations = recipes(demo)

    started = time.monotonic()
    work = Path(args.work)
    synth = work / "synth"
    if not (synth / "synth.json").exists():
        generate(str(synth), **SYNTH)
    bench = str(synth / "revisitop" / "roxsynth")
    init = args.init or str(work / "cvnet_init.pth")
    if not os.path.exists(init):
        save_checkpoint(initial_model({"init": None, "init_seed": 0, "depth": 50}), init,
                        {"stage": "random"})
    start = load_model(init)
    start.rerank_scale = demo.model.rerank_scale or start.rerank_scale  # the untrained, at the trained scale
    negatives = str(work / "hard_negatives.lance")
    if not os.path.exists(negatives):
        mine_negatives(start, str(synth / "gldv2"), negatives)
    print(f"[quality] data, init and negatives ready ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"\nsynthetic benchmark {SYNTH}, 2 DDP workers, {steps} steps, {demo.data.image_size} px "
          f"crops, rerank_scale {start.rerank_scale}, global top-{args.k} re-ranked (raw top-k "
          f"shortlist), fused global + 0.5 p\n")
    print("| model | Easy mAP | Medium mAP | Hard mAP |\n| --- | --- | --- | --- |", flush=True)
    for recipe in args.recipes:
        tic = time.monotonic()
        name = re.sub(r"[^\w.]+", "-", " ".join(["quality", recipe, str(steps), *args.overrides]))
        scaled = [f"curriculum.{key}.{field}="
                  f"{getattr(getattr(demo.curriculum, key), field) * steps // demo.optim.max_steps}"
                  for key in ("hard_share", "has_prob") for field in ("warmup_steps", "ramp_steps")]
        cfg = load_config(TrainRerankConfig, CONFIG, [
            f"name={name}", f"store={work / 'store'}",
            f"data.root={synth / 'gldv2'}", f"model.init={init}", f"negatives.table={negatives}",
            f"optim.max_steps={steps}", *scaled, *args.overrides, *ablations[recipe]])

        def trained_results():
            result = fit_stage2(pin_negatives(cfg.model_dump()))
            return evaluate_rerank(load_trained_model(result.checkpoint_path), bench, k=args.k,
                                   scales=(1.0,), rules=("topk",))

        results = cached(work / f"{name}.json", trained_results)
        row(f"trained: {recipe} ({time.monotonic() - tic:.0f} s)", results["rerank_topk"])
    base = cached(work / "baseline.json",  # last: the trained rows come first on a busy machine
                  lambda: evaluate_rerank(start, bench, k=args.k, scales=(1.0,), rules=("topk",)))
    row("global (start model)", base["global"])
    row("untrained re-ranker", base["rerank_topk"])
    print(f"\ntotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

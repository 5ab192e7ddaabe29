"""``cvnet demo``: the whole loop on synthetic landmarks, on embedded defaults (a local Ray,
``./cvnet-store``, MLflow in a SQLite file of the store).

synth -> stage 1 (2 DDP workers) -> extract -> mine -> stage 2 (2 DDP workers) -> re-rank and
evaluate; then new images arrive (the manifest grows) and a refresh runs: extract the new images
-> re-mine -> fine-tune stage 2 from the champion -> evaluate -> gate. Prints a table of global
vs re-ranked Easy / Medium / Hard mAP, whether the refresh promoted and why, and where everything
is (MLflow runs, registered models and their aliases, tables and their versions); ``--json``
prints the same as one JSON object (stdout holds nothing else). Rerunning it on the same store
finds the finished work instead of redoing it.

The configs: ``configs/demo.yaml`` (stage 1), ``configs/rerank-demo.yaml`` (stage 2) and
``configs/refresh-demo.yaml`` (the refresh, and the extraction, mining and evaluation settings of
the first pass, so both passes share their tables); ``stage1.KEY=V``, ``stage2.KEY=V`` and
``refresh.KEY=V`` override them, ``synth.KEY=V`` the synthetic collection (e.g. a smaller one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.cli import entrypoint

HELP = "the whole loop on synthetic data: stage 1 -> extract -> mine -> stage 2 -> evaluate, then a refresh"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SYNTH = {"seed": 0, "landmarks": 100, "images_per_landmark": 12, "queries": 20,
         "distractors": 60, "size": 128}
FIRST_SHARE = 0.8  # of the training images in the first pass; the rest arrive before the refresh
PREFIXES = ("synth", "stage1", "stage2", "refresh")
LABELS = {"global_untrained": "global, untrained model", "global": "global, stage 1",
          "rerank_topk": "re-ranked top-k (raw shortlist)", "rerank_gt_aware": "re-ranked top-k (GT-aware shortlist)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="store root (default CVNET_STORE or ./cvnet-store)")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    parser.add_argument("--stage1", default=str(CONFIGS / "demo.yaml"), help="stage-1 config")
    parser.add_argument("--stage2", default=str(CONFIGS / "rerank-demo.yaml"), help="stage-2 config")
    parser.add_argument("--refresh", default=str(CONFIGS / "refresh-demo.yaml"), help="refresh config")
    parser.add_argument("overrides", nargs="*", metavar="synth|stage1|stage2|refresh.KEY=VALUE",
                        help="overrides of the synthetic collection (" + ", ".join(SYNTH) + ") or of a config")


def split_overrides(words: list[str]) -> dict[str, list[str]]:
    """``stage1.optim.max_steps=5`` -> ``{"stage1": ["optim.max_steps=5"], ...}``."""
    from cvnet.config import ConfigError

    out: dict[str, list[str]] = {p: [] for p in PREFIXES}
    for word in words:
        prefix, _, rest = word.partition(".")
        if prefix not in out or "=" not in rest:
            raise ConfigError(f"{word}: expected {'|'.join(PREFIXES)}.KEY=VALUE")
        out[prefix].append(rest)
    return out


@contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Send everything written to stdout (this process's and Ray's log lines) to stderr."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class Clock:
    """Seconds per step, printed as they finish (to stderr with ``--json``)."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def done(self, step: str, what: str) -> None:
        now = time.monotonic()
        self.seconds[step] = round(now - self.last, 1)
        self.last = now
        print(f"[demo] {step}: {what} ({self.seconds[step]:.1f} s, {now - self.started:.1f} s in all)", flush=True)

    @property
    def total(self) -> float:
        return round(time.monotonic() - self.started, 1)


def ensure_collection(root: str, overrides: list[str]) -> None:
    """Generate the demo's synthetic collection under ``root`` (``SYNTH`` with ``overrides``)
    unless it is there already, generated with the same parameters."""
    from cvnet import storage
    from cvnet.config import ConfigError, parse_overrides
    from cvnet.data.synthetic import generate

    params = {**SYNTH, **parse_overrides(overrides)}
    unknown = sorted(set(params) - set(SYNTH))
    if unknown:
        raise ConfigError(f"synth.{unknown[0]}: not a parameter of the demo collection ({', '.join(SYNTH)})")
    fs, marker = storage.filesystem(storage.join(root, "synth.json"))
    if not fs.exists(marker):
        generate(root, **params)
        return
    found = json.loads(fs.cat_file(marker))
    found = {"seed": found["seed"], **found["parameters"]}
    clash = sorted(k for k in params if found.get(k) != params[k])
    if clash:
        raise ConfigError(f"synth.{clash[0]}: the store's collection has {found.get(clash[0])!r}, not "
                          f"{params[clash[0]]!r}; use another --store")


def map_rows(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """``label -> {easy, medium, hard}`` mAP x100."""
    from cvnet.data.revisitop import PROTOCOLS

    return {label: {p: round(100 * res[p]["map"], 2) for p in PROTOCOLS}
            for label, res in results.items()}


def table_versions(uris: dict[str, str]) -> dict[str, dict[str, Any]]:
    from cvnet.storage import redact
    from cvnet.tables import NotCommitted, Table

    out = {}
    for name, uri in uris.items():
        try:
            out[name] = {"uri": redact(uri), "version": Table.open(uri).version}
        except NotCommitted:
            out[name] = {"uri": redact(uri), "version": None}
    return out


def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The whole loop; returns the outcome (what ``--json`` prints)."""
    from cvnet import features, mining, registry, storage
    from cvnet.config import ConfigError, RefreshConfig, TrainGlobalConfig, TrainRerankConfig
    from cvnet.data.gldv2 import gldv2_manifest
    from cvnet.data.manifest import write_manifest
    from cvnet.retrieval import evaluate_global, flat_metrics
    from cvnet.tracking import mlflow_run, resolve_tracking_uri
    from cvnet.training.steps import build_global_net
    from jobs.config import load_config
    from pipelines.evaluate import run_evaluate
    from pipelines.extract import run_extract
    from pipelines.mine import run_mine
    from pipelines.ray_runtime import init_ray
    from pipelines.refresh import check_config, features_output, run_refresh, step_config
    from pipelines.train_global import train_global
    from pipelines.train_rerank import train_rerank

    clock, overrides = Clock(), split_overrides(args.overrides)
    store = args.store or storage.default_store()
    store = store if storage.is_remote(store) else os.path.abspath(store)
    synth = storage.join(store, "datasets", "synth-demo")
    gldv2, bench = storage.join(synth, "gldv2"), storage.join(synth, "revisitop", "roxsynth")
    first_manifest = storage.join(store, "datasets", "synth-train-first.parquet")
    all_manifest = storage.join(store, "datasets", "synth-train.parquet")
    common = [f"store={store}", f"data.root={gldv2}"]

    def stage2_config(init: str, negatives: str) -> TrainRerankConfig:
        return load_config(TrainRerankConfig, args.stage2, [*common, f"model.init={init}",
                                                            f"negatives.table={negatives}", "eval.benchmark=",
                                                            *overrides["stage2"]])

    # every config checked before any work, so a bad key fails in seconds, not after stage 1
    cfg1 = load_config(TrainGlobalConfig, args.stage1, [*common, f"eval.benchmark={bench}", *overrides["stage1"]])
    refresh = load_config(RefreshConfig, args.refresh, [
        f"store={store}", f"manifests=[{all_manifest}]", f"benchmark={bench}", f"train.data.root={gldv2}",
        *overrides["refresh"]])
    check_config(refresh)
    for prefix, cfg in (("stage1", cfg1), ("stage2", stage2_config("pending", "pending"))):
        if not cfg.register_as:
            raise ConfigError(f"{prefix}.register_as: the demo registers its models (the refresh starts from them)")

    ensure_collection(synth, overrides["synth"])
    images = gldv2_manifest(gldv2, "train_clean", verify_md5=False).sort_by("image_id")
    first = int(len(images) * FIRST_SHARE)  # a fixed share, by image id; the rest arrive before the refresh
    write_manifest(images.slice(0, first), first_manifest)
    clock.done("synth", f"synthetic collection in {synth}; {first} of {len(images)} training images for now")

    tracking_uri = resolve_tracking_uri(store)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # Ray workers resolve models:/ URIs there
    init_ray()
    stage1 = train_global(cfg1)
    clock.done("stage 1", f"{stage1.model_uri} at step {stage1.step}, cvnet-global version {stage1.model_version}")

    global_model = f"models:/{cfg1.register_as}/{stage1.model_version}"
    features_uri = features_output(refresh, store, global_model)
    extracted = run_extract(step_config(refresh, "extract", manifest=first_manifest, model=global_model,
                                        store=store, output=features_uri))
    clock.done("extract", f"{extracted.images} image(s) with {global_model} into {features_uri}")
    mined = run_mine(step_config(refresh, "mine", features=features_uri, store=store))
    negatives = storage.join(mined.output, mining.TABLE)
    clock.done("mine", f"{mined.rows} row(s) of hard negatives in {negatives}")

    cfg2 = stage2_config(global_model, negatives)
    stage2 = train_rerank(cfg2)
    clock.done("stage 2", f"{stage2.model_uri} at step {stage2.step}, cvnet-rerank version {stage2.model_version}")

    rerank_model = f"models:/{cfg2.register_as}/{stage2.model_version}"
    ecfg = step_config(refresh, "evaluate", benchmark=bench, model=rerank_model, rerank=True, store=store)
    evaluated = run_evaluate(ecfg)
    initial = build_global_net(cfg1.model.depth, cfg1.model.init_seed, cfg1.model.backbone_init).eval()
    results = {"global_untrained": evaluate_global(initial, bench, ecfg.scales), **evaluated.metrics}
    with mlflow_run("cvnet-demo", tracking_uri, run_name="demo-evaluate",
                    params={"model": rerank_model, "benchmark": bench, "rankings": evaluated.rankings}) as run:
        import mlflow

        mlflow.log_metrics(flat_metrics(results))
        evaluate_run = run.info.run_id
    clock.done("evaluate", f"{rerank_model} on {bench}: rankings in {evaluated.rankings}")

    write_manifest(images, all_manifest)
    clock.done("new images", f"{len(images) - first} training image(s) arrive: {all_manifest}")
    refreshed = run_refresh(refresh, tracking_uri)
    clock.done("refresh", refreshed.message)

    state = refreshed.state
    gate = state.steps["gate"] if state else None
    metric = refresh.promote.metric
    outcome = {
        "store": storage.redact(store),
        "map": map_rows(results),
        "refresh": {"message": refreshed.message, "id": state.id if state else None,
                    "promoted": gate["promoted"] if gate else None, "reason": gate["reason"] if gate else None,
                    "candidate_version": state.steps["register"]["version"] if state else None,
                    "metric": metric,
                    "candidate": state.steps["evaluate"]["candidate_metrics"].get(metric) if state else None,
                    "champion": state.steps["evaluate"]["champion_metrics"].get(metric) if state else None},
        "mlflow": {"tracking_uri": storage.redact(tracking_uri),
                   "runs": {"stage 1": stage1.run_id, "stage 2": stage2.run_id, "evaluate": evaluate_run,
                            **({"refresh": f"refresh-{state.id}"} if state else {})}},
        "models": {name: {alias: getattr(found, alias) for alias in registry.ALIASES}
                   for name in ("cvnet-global", "cvnet-rerank") for found in [registry.aliases(name)]},
        "tables": table_versions({"features": storage.join(features_uri, features.FEATURES),
                                  "bad inputs": storage.join(features_uri, features.BAD_INPUTS),
                                  "hard negatives": negatives, "rankings": evaluated.rankings}),
        "checkpoints": storage.redact(storage.join(store, "checkpoints")),
        "seconds": {**clock.seconds, "total": clock.total},
    }
    import ray

    ray.shutdown()
    return outcome


def format_outcome(out: dict[str, Any]) -> str:
    """The outcome as the lines ``cvnet demo`` prints."""
    rows = ["| retrieval | Easy mAP | Medium mAP | Hard mAP |", "| --- | --: | --: | --: |"]
    rows += [f"| {LABELS.get(label, label)} | {m['easy']:.2f} | {m['medium']:.2f} | {m['hard']:.2f} |"
             for label, m in out["map"].items()]
    ref = out["refresh"]
    lines = ["", *rows, "", f"refresh: {ref['message']}"]
    if ref["candidate"] is not None:
        lines.append(f"  {ref['metric']}: candidate {ref['candidate']:.2f} vs champion {ref['champion']:.2f}")
    lines += ["", f"store: {out['store']}", f"MLflow: {out['mlflow']['tracking_uri']}"]
    lines += [f"  run {name}: {run}" for name, run in out["mlflow"]["runs"].items()]
    lines += [f"model {name}: " + ", ".join(f"{a} {v or '-'}" for a, v in found.items())
              for name, found in out["models"].items()]
    lines += [f"table {name}: {t['uri']} (version {t['version']})" for name, t in out["tables"].items()]
    lines += [f"checkpoints: {out['checkpoints']}",
              "seconds: " + ", ".join(f"{step} {s:.0f}" for step, s in out["seconds"].items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    with stdout_to_stderr(args.json):
        outcome = run_loop(args)
    print(json.dumps(outcome, indent=1) if args.json else format_outcome(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

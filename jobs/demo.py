"""``cvnet demo``: synthetic landmarks -> stage-1 DDP training -> extraction -> evaluation.

Runs on one machine with embedded defaults (a local Ray, ``./cvnet-store``, MLflow in a SQLite
file of the store) and prints Medium / Hard mAP of the initial and the trained model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jobs.cli import entrypoint

HELP = "end-to-end demo: synth -> train-global (2 DDP workers) -> extract -> evaluate"
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SYNTH = {"seed": 0, "landmarks": 100, "images_per_landmark": 12, "queries": 20,
         "distractors": 60, "size": 128}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="store root (default CVNET_STORE or ./cvnet-store)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="training config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def ensure_synth(root: str) -> str:
    """Generate the demo collection under ``root`` unless it is there already."""
    from cvnet.data.synthetic import generate

    if not (Path(root) / "synth.json").exists():
        generate(root, **SYNTH)
    return root


def db_manifest(bench: str, uri: str) -> str:
    """Write the benchmark's database images (no queries) as a manifest at ``uri``."""
    import pyarrow.compute as pc

    from cvnet.data.manifest import write_manifest
    from cvnet.data.revisitop import revisitop_manifest
    from cvnet.eval.revisitop import benchmark_name

    table = revisitop_manifest(bench, benchmark_name(bench))
    write_manifest(table.filter(pc.equal(table["split"], "db")), uri)
    return uri


def extract_and_evaluate(net, model_uri: str, bench: str, manifest: str, output: str,
                         scales: tuple[float, ...]) -> dict:
    """Database descriptors through the extraction pipeline, then revisitop metrics."""
    from cvnet.config import ExtractConfig
    from cvnet.storage import file_sha256
    from cvnet.retrieval import evaluate_global
    from pipelines.extract import run_extract

    run_extract(ExtractConfig(manifest=manifest, model=model_uri, output=output, scales=scales,
                              shard_size=100, num_actors=1, actor_cpus=1.0, torch_threads=2))
    return evaluate_global(net, bench, scales, features=output, model_sha256=file_sha256(model_uri))


def run(args: argparse.Namespace) -> int:
    import mlflow

    from cvnet import storage
    from cvnet.training.steps import build_global_net
    from jobs.config import TrainGlobalConfig, load_config
    from cvnet.eval.revisitop import format_table
    from jobs.train_global import eval_metrics, export_model, train

    started = time.monotonic()
    store = args.store or storage.default_store()
    store = store if storage.is_remote(store) else os.path.abspath(store)
    synth = ensure_synth(storage.join(store, "datasets", "synth-demo"))
    bench = storage.join(synth, "revisitop", "roxsynth")
    cfg = load_config(TrainGlobalConfig, args.config,
                      [f"store={store}", f"data.root={synth}/gldv2", "eval.benchmark=",
                       *args.overrides])
    print(f"[demo] synthetic collection in {synth} ({time.monotonic() - started:.0f} s)", flush=True)
    outcome = train(cfg)
    print(f"[demo] trained to step {outcome.step} ({time.monotonic() - started:.0f} s)", flush=True)
    initial = build_global_net(cfg.model.depth, cfg.model.init_seed, cfg.model.backbone_init).eval()
    initial_uri = storage.join(store, "models", cfg.name, "cvnet_initial.pth")
    export_model(initial, initial_uri, {"step": 0, "train_name": cfg.name})
    manifest = db_manifest(bench, storage.join(store, "datasets", "roxsynth_db.parquet"))
    results = {}
    for label, net, uri in (("initial", initial, initial_uri),
                            ("trained", outcome.net, outcome.model_uri)):
        output = storage.join(store, "features", f"{cfg.name}-{label}", "roxsynth_db")
        results[label] = extract_and_evaluate(net, uri, bench, manifest, output, cfg.eval.scales)
    with mlflow.start_run(run_id=outcome.run_id):
        for label, res in results.items():
            mlflow.log_metrics(eval_metrics(f"demo_{label}", res), step=outcome.step)
    print(format_table(results))
    print(f"[demo] MLflow run {outcome.run_id} (experiment {cfg.experiment}) at "
          f"{outcome.tracking_uri}; models in {storage.join(store, 'models', cfg.name)}; "
          f"checkpoints in {storage.join(store, 'checkpoints', cfg.name)}; "
          f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

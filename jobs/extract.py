"""``cvnet extract``: global descriptors (and optionally rerank features) for an image manifest.

Runs on the Ray cluster at ``--address`` / ``RAY_ADDRESS`` (a local one is started otherwise)
and is what ``cvnet submit extract ...`` runs on a cluster. Output: committed Parquet shards under
``<store>/features/<model>/<manifest>/`` (or ``--output``); a rerun resumes. One MLflow run per job.
"""
from __future__ import annotations

import argparse
import os
import sys

from jobs.cli import entrypoint

HELP = "extract descriptors (and rerank features) for a manifest on Ray, exactly once, resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="image manifest URI (Parquet or CSV)")
    parser.add_argument("--model", required=True, help="checkpoint URI")
    parser.add_argument("--store", default=None, help="store root (default CVNET_STORE or ./cvnet-store)")
    parser.add_argument("--output", default=None, help="output folder (default <store>/features/<model>/<manifest>)")
    parser.add_argument("--rerank-features", action="store_true", help="also store the rerank pyramid features")
    parser.add_argument("--float16", action="store_true", help="store features as float16")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.7071, 1.0, 1.4142])
    parser.add_argument("--shard-size", type=int, default=1000, help="manifest rows per committed shard")
    parser.add_argument("--actors", type=int, default=1, help="model actors")
    parser.add_argument("--actor-cpus", type=float, default=0.5, help="CPUs reserved per actor")
    parser.add_argument("--actor-gpus", type=float, default=0.0, help="GPUs per actor (0: CPU actors)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--part-rows", type=int, default=64, help="images per actor call and Parquet part")
    parser.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else local)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (AWS_ENDPOINT_URL)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--experiment", default="extract", help="MLflow experiment")


def _stem(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0] or "data"


def default_output(store: str, model: str, manifest: str) -> str:
    """``<store>/features/<model name>/<manifest name>``."""
    from cvnet.storage import join

    return join(store, "features", _stem(model), _stem(manifest))


def run(args: argparse.Namespace) -> int:
    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    import mlflow

    from cvnet import storage
    from cvnet.tracking import mlflow_run, resolve_tracking_uri
    from pipelines.extract import ExtractConfig, run_extract
    from pipelines.ray_runtime import init_ray

    store = args.store or storage.default_store()
    cfg = ExtractConfig(
        manifest=args.manifest, model=args.model,
        output=args.output or default_output(store, args.model, args.manifest),
        rerank_features=args.rerank_features, scales=tuple(args.scales), float16=args.float16,
        shard_size=args.shard_size, num_actors=args.actors, actor_cpus=args.actor_cpus,
        actor_gpus=args.actor_gpus, torch_threads=args.threads, batch_size=args.batch_size,
        part_rows=args.part_rows)
    init_ray(args.address)
    params = vars(cfg)
    with mlflow_run(args.experiment, resolve_tracking_uri(store, args.tracking_uri),
                    run_name=f"extract-{_stem(args.manifest)}", params=params):
        result = run_extract(cfg)
        mlflow.log_metrics({"images_per_s": result.images_per_s, "images": result.images,
                            "failures": result.bad_inputs, "shards": result.shards,
                            "shards_skipped": result.shards_skipped, "seconds": result.seconds})
        fs, path = storage.filesystem(result.commit_uri)
        mlflow.log_text(fs.cat_file(path).decode(), storage.JOB_COMMIT)
        mlflow.log_text(result.stats or "nothing to run: all shards committed", "ds_stats.txt")
    print(f"processed {result.images} images ({result.bad_inputs} bad inputs in all, "
          f"{result.shards_skipped}/{result.shards} shards already committed) into "
          f"{storage.redact(result.output)} in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

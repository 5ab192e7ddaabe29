"""``cvnet extract``: global descriptors (and optionally rerank features) for an image manifest.

Configured by :class:`cvnet.config.ExtractConfig` (``--config FILE``, ``--<key>`` flags,
``key=value`` overrides; ``cvnet extract --help`` lists the keys). Runs on the Ray cluster at
``--address`` / ``RAY_ADDRESS`` (a local one is started otherwise) and is what
``cvnet submit extract ...`` runs on a cluster. Output: committed Parquet shards under
``<store>/features/<model>/<manifest>/`` (or ``--output``); a rerun resumes. One MLflow run per job.
"""
from __future__ import annotations

import argparse
import os
import sys

from jobs.cli import entrypoint

HELP = "extract descriptors (and rerank features) for a manifest on Ray, exactly once, resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.config import ExtractConfig, add_config_arguments

    add_config_arguments(parser, ExtractConfig)


def _stem(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0] or "data"


def default_output(store: str, model: str, manifest: str) -> str:
    """``<store>/features/<model name>/<manifest name>``."""
    from cvnet.storage import join

    return join(store, "features", _stem(model), _stem(manifest))


def run(args: argparse.Namespace) -> int:
    from jobs.config import ExtractConfig, config_from_args

    cfg = config_from_args(ExtractConfig, args)
    if cfg.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint_url
    import mlflow

    from cvnet import storage
    from cvnet.tracking import mlflow_run, resolve_tracking_uri
    from pipelines.extract import ExtractConfig as PipelineConfig
    from pipelines.extract import run_extract
    from pipelines.ray_runtime import init_ray

    store = cfg.store or storage.default_store()
    output = cfg.output or default_output(store, cfg.model, cfg.manifest)
    init_ray(cfg.address)
    with mlflow_run(cfg.experiment, resolve_tracking_uri(store, cfg.tracking_uri),
                    run_name=f"extract-{_stem(cfg.manifest)}",
                    params={**cfg.model_dump(), "output": output}):
        # TODO(lead-merge): run_extract(cfg), once the pipeline takes cvnet.config.ExtractConfig
        legacy = cfg.model_dump(include=set(PipelineConfig.__dataclass_fields__))
        result = run_extract(PipelineConfig(**{**legacy, "output": output}))
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

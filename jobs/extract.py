"""``cvnet extract``: global descriptors (and optionally rerank features) for an image manifest.

Configured by :class:`cvnet.config.ExtractConfig` (``--config FILE``, ``--<key>`` flags,
``key=value`` overrides; ``cvnet extract --help`` lists the keys). Runs on the Ray cluster at
``--address`` / ``RAY_ADDRESS`` (a local one is started otherwise) and is what
``cvnet submit extract ...`` runs on a cluster. Output: the model's committed tables under
``<store>/features/<model>-<sha12>/`` (or ``--output``), grown by every manifest; a rerun
resumes. One MLflow run per job, with the table versions read and written.
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


def run(args: argparse.Namespace) -> int:
    from jobs.config import ExtractConfig, config_from_args

    cfg = config_from_args(ExtractConfig, args)
    if cfg.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint_url
    import mlflow

    from cvnet import storage
    from cvnet.tracking import mlflow_run, resolve_tracking_uri
    from pipelines.extract import run_extract
    from pipelines.ray_runtime import init_ray

    store = cfg.store or storage.default_store()
    tracking_uri = resolve_tracking_uri(store, cfg.tracking_uri, cfg.address)  # fails fast on a cluster
    init_ray(cfg.address)
    with mlflow_run(cfg.experiment, tracking_uri, run_name="extract", params=cfg.model_dump()):
        result = run_extract(cfg)
        mlflow.log_params({f"{name}_version_read": v for name, v in result.versions_read.items()}
                          | {f"{name}_version_written": v for name, v in result.versions_written.items()}
                          | {"features_uri": storage.redact(result.output)})
        mlflow.log_metrics({"images_per_s": result.images_per_s, "images": result.images,
                            "bad_inputs": result.bad_inputs, "skipped": result.skipped,
                            "seconds": result.seconds})
    print(f"processed {result.images} images ({result.bad_inputs} bad inputs, {result.skipped} already "
          f"committed) into {storage.redact(result.output)} in {result.seconds:.1f} s; table versions "
          f"{result.versions_read} -> {result.versions_written}")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

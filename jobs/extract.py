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
import sys

from jobs.cli import entrypoint

HELP = "extract descriptors (and rerank features) for a manifest on Ray, exactly once, resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.config import ExtractConfig, add_config_arguments

    add_config_arguments(parser, ExtractConfig)


def run(args: argparse.Namespace) -> int:
    from jobs.config import ExtractConfig, config_from_args

    cfg = config_from_args(ExtractConfig, args)
    import mlflow

    from cvnet import storage
    from jobs.runtime import log_tables, pipeline_run
    from pipelines.extract import run_extract

    with pipeline_run(cfg, "extract"):
        result = run_extract(cfg)
        log_tables(result.versions_read, result.versions_written, features=result.output)
        mlflow.log_metrics({"images_per_s": result.images_per_s, "images": result.images,
                            "bad_inputs": result.bad_inputs, "skipped": result.skipped,
                            "seconds": result.seconds})
    print(f"processed {result.images} images ({result.bad_inputs} bad inputs, {result.skipped} already "
          f"committed) into {storage.redact(result.output)} in {result.seconds:.1f} s; table versions "
          f"{result.versions_read} -> {result.versions_written}")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

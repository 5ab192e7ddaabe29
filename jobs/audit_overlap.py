"""``cvnet audit-overlap``: which benchmark images (queries and database) have near-copies in the
training set, as a committed table and an HTML report with thumbnails side by side.

Configured by :class:`cvnet.config.AuditOverlapConfig` (``--train``, ``--benchmark``,
``--threshold``, ...). Runs in this process (exact search over the training features, block by
block). Output: ``<store>/audits/<train>-v<version>-vs-<benchmark>/`` with ``overlap.lance`` and
``report.html``; one MLflow run with the table versions and the number flagged.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint

HELP = "list benchmark images with near-copies among the training images (table + HTML report)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.config import AuditOverlapConfig
    from jobs.config import add_config_arguments

    add_config_arguments(parser, AuditOverlapConfig)


def run(args: argparse.Namespace) -> int:
    from cvnet.config import AuditOverlapConfig
    from jobs.config import config_from_args

    cfg = config_from_args(AuditOverlapConfig, args)
    import mlflow

    from cvnet import storage
    from cvnet.eval.overlap import audit
    from jobs.runtime import pipeline_run

    with pipeline_run(cfg, "audit-overlap", ray=False):
        output, rows, versions = audit(cfg)
        flagged = sum(1 for lists in rows.column("train_ids").to_pylist() if lists)
        mlflow.log_params(versions | {"audit_uri": storage.redact(output)})
        mlflow.log_metrics({"benchmark_images": rows.num_rows, "flagged": flagged})
    print(f"{flagged} of {rows.num_rows} benchmark images have a training image scoring >= {cfg.threshold}; "
          f"report: {storage.redact(storage.join(output, 'report.html'))}")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

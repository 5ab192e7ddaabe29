"""``cvnet rerank``: global shortlists, CVNet re-ranking and fused rankings for a gallery on Ray.

Configured by :class:`cvnet.config.RerankConfig` (``--config FILE``, ``--<key>`` flags,
``key=value`` overrides; ``cvnet rerank --help`` lists the keys). Queries and gallery are
extraction outputs of the model (``--queries`` omitted: all-vs-all over the gallery). Output: the
rankings table (``query_id, rank, image_id, global_score, rerank_score, score``) under
``<store>/rankings/<name>/`` (or ``--out``), committed exactly once per query; a rerun resumes and
a grown query table adds only its new queries. One MLflow run per job.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint

HELP = "re-rank a gallery's global shortlists with CVNet on Ray: rankings table, exactly once, resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.config import RerankConfig
    from jobs.config import add_config_arguments

    add_config_arguments(parser, RerankConfig)


def run(args: argparse.Namespace) -> int:
    from cvnet.config import RerankConfig
    from jobs.config import config_from_args

    cfg = config_from_args(RerankConfig, args)
    import mlflow

    from cvnet import storage
    from jobs.runtime import log_tables, pipeline_run
    from pipelines.rerank import run_rerank

    with pipeline_run(cfg, cfg.name):
        result = run_rerank(cfg)
        log_tables(result.versions_read, result.versions_written, rankings=result.output)
        mlflow.log_metrics({"queries": result.queries, "skipped": result.skipped, "pairs": result.pairs,
                            "images": result.images, "queries_per_s": result.queries_per_s,
                            "seconds": result.seconds}
                           | ({f"recall_at_{cfg.k}": result.recall} if result.recall is not None else {}))
    recall = f", IVF recall@{cfg.k} {result.recall:.4f}" if result.recall is not None else ""
    print(f"ranked {result.queries} queries ({result.skipped} already committed, {result.pairs} pairs over "
          f"{result.images} gallery images{recall}) into {storage.redact(result.output)} in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

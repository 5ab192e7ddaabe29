"""``cvnet evaluate``: revisitop metrics of a model on a benchmark, through the Ray pipeline.

Configured by :class:`cvnet.config.EvaluateConfig`. Extraction (database + optional distractors,
cropped queries) -> rankings (global, or re-ranked top-K) -> revisitop E / M / H mAP and mP@k,
labelled ``global``, ``rerank_topk`` (raw top-K shortlist) and ``rerank_gt_aware`` (the paper's
shortlist: the protocol's junk removed first). No image is held in the driver. One MLflow run.
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import entrypoint

HELP = "evaluate a model on a revisitop-format benchmark on Ray (global and re-ranked mAP / mP@k)"
LABELS = {"global": "global", "rerank_topk": "re-ranked, raw top-K shortlist",
          "rerank_gt_aware": "re-ranked, GT-aware shortlist (paper)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.config import EvaluateConfig
    from jobs.config import add_config_arguments

    add_config_arguments(parser, EvaluateConfig)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def format_metrics(metrics: dict[str, dict[str, dict[str, float]]], k: int) -> str:
    """A Markdown table, one row per label: mAP and mP@10 (x100) per protocol."""
    head = ["Easy mAP", "Medium mAP", "Hard mAP", "Easy mP@10", "Medium mP@10", "Hard mP@10"]
    lines = ["| ranking | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, res in metrics.items():
        values = [res[p]["map"] for p in ("easy", "medium", "hard")] + [res[p]["mp@10"] for p in ("easy", "medium", "hard")]
        name = LABELS[label] + (f" (K={k})" if label != "global" else "")
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cvnet.config import EvaluateConfig
    from jobs.config import config_from_args

    cfg = config_from_args(EvaluateConfig, args)
    import mlflow

    from cvnet import storage
    from jobs.runtime import log_tables, pipeline_run
    from pipelines.evaluate import run_evaluate

    with pipeline_run(cfg, "evaluate"):
        result = run_evaluate(cfg)
        log_tables(result.versions_read, result.versions_written, rankings=result.rankings)
        mlflow.log_params({"database_images": result.database_images})
        mlflow.log_metrics({f"{label}_{protocol}_{name.replace('@', '_at_')}": value
                            for label, res in result.metrics.items() for protocol, scores in res.items()
                            for name, value in scores.items()})
    if args.json:
        print(json.dumps(result.metrics, sort_keys=True))
    else:
        print(f"{result.database_images} database images; rankings {storage.redact(result.rankings)}")
        print(format_metrics(result.metrics, cfg.k))
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

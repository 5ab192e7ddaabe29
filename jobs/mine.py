"""``cvnet mine``: hard negatives of a features table on Ray (exact, sharded, incremental).

Configured by :class:`cvnet.config.MineConfig` (``--config FILE``, ``--<key>`` flags, ``key=value``
overrides; ``cvnet mine --help`` lists the keys). The issue's ``--actors`` and ``--out`` are
``--num-actors`` and ``--output`` here, as in every job. Output: the committed table
``hard_negatives.lance`` under ``<store>/mining/<features>-keep<keep>-<precision>/`` (or
``--output``); a rerun resumes, and a rerun after the features grew re-mines only the new work.
One MLflow run per job: the settings, the table versions read and written, pairs and pairs/s.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint

HELP = "mine hard negatives of a features table on Ray: exact, resumable, incremental"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.config import MineConfig
    from jobs.config import add_config_arguments

    add_config_arguments(parser, MineConfig)


def run(args: argparse.Namespace) -> int:
    from cvnet.config import MineConfig
    from jobs.config import config_from_args

    cfg = config_from_args(MineConfig, args)
    import mlflow

    from cvnet import storage
    from jobs.runtime import log_tables, pipeline_run
    from pipelines.mine import run_mine

    with pipeline_run(cfg, "mine"):
        result = run_mine(cfg)
        log_tables(result.versions_read, result.versions_written, hard_negatives=result.output)
        mlflow.log_metrics({"pairs_per_s": result.pairs_per_s, "pairs": result.pairs,
                            "full_pairs": result.full_pairs, "rows": result.rows,
                            "rows_incremental": result.plan.rows - len(result.plan.full),
                            "seconds": result.seconds})
    print(f"mined {result.rows} rows ({result.pairs:,} pairs, a full re-mine is {result.full_pairs:,}; "
          f"{result.pairs_per_s:.3g} pairs/s) into {storage.redact(result.output)} in {result.seconds:.1f} s; "
          f"table versions {result.versions_read} -> {result.versions_written}")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

"""``cvnet train-rerank``: stage-2 training (CVNet-Rerank) on Ray Train DDP workers.

Starts from ``model.init`` (a released CVNet checkpoint or a stage-1 export), keeps the backbone
frozen and trains the re-ranker on (anchor, positive / negative) pairs with hard negatives from
``negatives.table`` (its version pinned and logged), Hide-and-Seek and a curriculum. One MLflow
run per training run (found again by run name, so a rerun appends to it); at the end the model
is saved as a CVNet checkpoint ``<store>/models/<name>/cvnet_rerank.pth``, evaluated with
re-ranking on ``eval.benchmark`` when one is given, logged and registered as ``cvnet-rerank``.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint

HELP = "train the re-ranker (stage 2) with DDP; --config FILE [--flags] [key=value ...]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.config import TrainRerankConfig
    from jobs.config import add_config_arguments

    add_config_arguments(parser, TrainRerankConfig)


def run(args: argparse.Namespace) -> int:
    from cvnet.config import TrainRerankConfig
    from jobs.config import config_from_args
    from pipelines.train_rerank import train_rerank

    outcome = train_rerank(config_from_args(TrainRerankConfig, args))
    print(outcome.summary())
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

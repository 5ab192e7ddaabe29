"""``cvnet train-global``: stage-1 training (CVNet-Global) on Ray Train DDP workers.

One MLflow run per training run (found again by run name, so a rerun after a driver crash
appends to it); at the end the trained network is saved as a CVNet checkpoint in
``<store>/models/<name>/``, evaluated on ``eval.benchmark`` when one is given, logged and
registered as ``cvnet-global``.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import entrypoint

HELP = "train the global descriptor (stage 1) with DDP; --config FILE [--flags] [key=value ...]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.config import TrainGlobalConfig
    from jobs.config import add_config_arguments

    add_config_arguments(parser, TrainGlobalConfig)


def run(args: argparse.Namespace) -> int:
    from cvnet.config import TrainGlobalConfig
    from jobs.config import config_from_args
    from pipelines.train_global import train_global

    outcome = train_global(config_from_args(TrainGlobalConfig, args))
    print(outcome.summary())
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

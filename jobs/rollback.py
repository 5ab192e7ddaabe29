"""``cvnet rollback NAME [--reason R]``: make the ``previous`` version the champion again.

The reason and time are recorded as tags of both versions; ``previous`` is then unset. The
registry is the tracking server's (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
``<store>/mlflow.db``).
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import add_store_arguments, entrypoint

HELP = "make the 'previous' version of a registered model the champion again"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model, e.g. cvnet-global")
    parser.add_argument("--reason", default="rolled back by hand", help="recorded on the model versions")
    add_store_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cvnet.registry import connect, rollback

    connect(args.store, args.tracking_uri)
    print(rollback(args.name, args.reason))
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

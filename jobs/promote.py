"""``cvnet promote NAME VERSION [--reason R]``: make a registered version the champion.

The champion it replaces becomes ``previous`` (``cvnet rollback NAME`` restores it); the reason
and time are recorded as tags of both versions. The registry is the tracking server's
(``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``<store>/mlflow.db``).
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import add_store_arguments, entrypoint

HELP = "make a registered model version the champion (the one it replaces becomes 'previous')"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model, e.g. cvnet-global")
    parser.add_argument("version", help="model version number")
    parser.add_argument("--reason", default="promoted by hand", help="recorded on the model versions")
    add_store_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cvnet.registry import connect, promote

    connect(args.store, args.tracking_uri)
    print(promote(args.name, args.version, args.reason))
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

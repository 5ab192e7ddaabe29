"""``cvnet evaluate-gldv2``: GLDv2 retrieval mAP@100 (Public / Private) of a rankings table.

Reads a committed rankings table (``cvnet rerank`` output, ``query_id`` = GLDv2 test id,
``image_id`` = index id) and ``retrieval_solution_v2.1.csv``; ranks beyond 100 are ignored.
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import entrypoint

HELP = "GLDv2 retrieval mAP@100 (Public / Private) of a rankings table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rankings", required=True, help="rankings table URI (cvnet rerank --out)")
    parser.add_argument("--solution", required=True, help="retrieval_solution_v2.1.csv")
    parser.add_argument("--version", type=int, default=None, help="rankings table version (default: latest)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from cvnet.eval.gldv2 import map_at_100, predictions_from_rankings
    from cvnet.tables import Table

    rankings = Table.open(args.rankings, args.version).read(["query_id", "rank", "image_id"])
    results = map_at_100(predictions_from_rankings(rankings), args.solution)
    print(json.dumps(results, sort_keys=True) if args.json else
          "\n".join(f"{usage}: mAP@100 = {100 * value:.2f}" for usage, value in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

"""``cvnet evaluate``: global retrieval on a revisitop-format benchmark.

Database descriptors come from the store (an extraction output, ``--features``) or are computed
with the model; query descriptors are always computed (queries are cropped to their ``bbx``, as
the reference does). Ranking is exact faiss inner-product search; metrics are revisitop mAP.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from jobs.cli import entrypoint

HELP = "evaluate a global model on a revisitop-format benchmark (mAP Easy / Medium / Hard)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True,
                        help="revisitop dataset folder (gnd_<name>.pkl + jpg/)")
    parser.add_argument("--model", required=True, help="CVNet checkpoint URI")
    parser.add_argument("--features", default=None,
                        help="extraction output with the database descriptors (default: compute)")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="inference scales (default: the three of the paper)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def benchmark_name(root: str) -> str:
    """The dataset name of a revisitop folder: its last path component."""
    return PurePosixPath(root.rstrip("/")).name


def query_descriptors(net: Any, root: str, gt: dict, scales: Sequence[float]):
    """(n_queries, dim) descriptors of the cropped queries."""
    from cvnet.data.revisitop import load_query_image
    from cvnet.models.global_net import multiscale_descriptors

    images = [load_query_image(root, gt, q) for q in range(len(gt["qimlist"]))]
    return multiscale_descriptors(net, images, scales)


def database_descriptors(net: Any, root: str, gt: dict, scales: Sequence[float],
                         features: str | None = None, model_sha256: str | None = None):
    """(n_db, dim) database descriptors in ``imlist`` order: read from the extraction output
    ``features`` (refused unless extracted by the model of hash ``model_sha256``) or computed."""
    import numpy as np

    from cvnet.data.revisitop import load_image
    from cvnet.features import read_descriptors
    from cvnet.models.global_net import multiscale_descriptors

    if features is None:
        images = [load_image(root, n) for n in gt["imlist"]]
        return multiscale_descriptors(net, images, scales)
    ids, X = read_descriptors(features, model_sha256=model_sha256)
    where = {image_id: i for i, image_id in enumerate(ids)}
    missing = [n for n in gt["imlist"] if n not in where]
    if missing:
        raise KeyError(f"{features}: no descriptor for database image {missing[0]!r} "
                       f"({len(missing)} missing)")
    return X[np.array([where[n] for n in gt["imlist"]])]


def evaluate_global(net: Any, root: str, scales: Sequence[float] | None = None,
                    features: str | None = None, model_sha256: str | None = None) -> dict[str, dict[str, float]]:
    """revisitop metrics (fractions) of global network ``net`` on the benchmark at ``root``."""
    from cvnet import storage
    from cvnet.data.revisitop import load_ground_truth
    from cvnet.eval.revisitop import evaluate
    from cvnet.index import ranks_for_revisitop

    from cvnet.config import DEFAULT_SCALES

    scales = scales or DEFAULT_SCALES
    gt = load_ground_truth(storage.join(root, f"gnd_{benchmark_name(root)}.pkl"))
    queries = query_descriptors(net, root, gt, scales)
    database = database_descriptors(net, root, gt, scales, features, model_sha256)
    return evaluate(ranks_for_revisitop(queries, database), gt)


def format_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table of mAP (x100) per model: Easy / Medium / Hard."""
    lines = ["| model | Easy mAP | Medium mAP | Hard mAP |", "| --- | --- | --- | --- |"]
    for name, res in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * res[p]['map']:.2f}"
                                                 for p in ("easy", "medium", "hard")) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cvnet.models.checkpoints import load_model
    from cvnet.registry import resolve_checkpoint
    from cvnet.storage import file_sha256

    net = load_model(args.model).encoder_q
    sha = file_sha256(resolve_checkpoint(args.model)) if args.features else None  # this model's features
    results = evaluate_global(net, args.benchmark, args.scales, args.features, sha)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        print(format_table({args.model: results}))
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

"""``cvnet report RANKINGS --benchmark DIR``: an HTML page + PNGs of a rankings table, in MLflow.

Per-query AP scatter (global vs re-ranked), precision-recall curves, and the top-10 grids of the
10 worst and 10 most improved queries with thumbnails framed positive / negative / junk. Written
to ``--out`` (default ``<store>/reports/<rankings folder name>``) and logged as artifacts of one
MLflow run.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import add_store_arguments, entrypoint

HELP = "HTML report (AP scatter, PR curves, top-10 grids) of a rankings table on a revisitop benchmark"
THUMB = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rankings", help="rankings table URI (cvnet rerank / cvnet evaluate output)")
    parser.add_argument("--benchmark", required=True, help="revisitop dataset folder (gnd_<name>.pkl + jpg/)")
    parser.add_argument("--protocol", default="medium", choices=("easy", "medium", "hard"))
    parser.add_argument("--out", default=None, help="report folder (default <store>/reports/<rankings name>)")
    add_store_arguments(parser)
    parser.add_argument("--experiment", default="report", help="MLflow experiment")


def run(args: argparse.Namespace) -> int:
    import cv2
    import mlflow

    from cvnet import storage
    from cvnet.data.revisitop import benchmark_name, ground_truth_uri, load_ground_truth, load_image, load_query_image
    from cvnet.eval.report import write_report
    from cvnet.tables import Table
    from cvnet.tracking import mlflow_run, resolve_tracking_uri

    store = args.store or storage.default_store()
    gt = load_ground_truth(ground_truth_uri(args.benchmark))
    queries = {name: q for q, name in enumerate(gt["qimlist"])}
    known = set(gt["imlist"])

    def thumbnail(image_id: str, is_query: bool):
        if is_query:
            image = load_query_image(args.benchmark, gt, queries[image_id])
        elif image_id in known:
            image = load_image(args.benchmark, image_id)
        else:
            return None  # a distractor outside the benchmark folder
        scale = THUMB / max(image.shape[:2])
        small = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))))
        return small[:, :, ::-1]

    table = Table.open(args.rankings)
    out = args.out or storage.join(store, "reports", args.rankings.rstrip("/").rsplit("/", 1)[-1])
    with mlflow_run(args.experiment, resolve_tracking_uri(store, args.tracking_uri), run_name="report",
                    params={"rankings": storage.redact(args.rankings), "rankings_version_read": table.version,
                            "benchmark": storage.redact(args.benchmark), "protocol": args.protocol}):
        page = write_report(out, table.read(), gt, thumbnail, args.protocol,
                            title=f"{benchmark_name(args.benchmark)}: {args.rankings.rstrip('/').rsplit('/', 1)[-1]}")
        mlflow.log_artifacts(out, artifact_path="report")
    print(f"report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

"""Data-path speed: GLDv2 CSV parsing, image reads (folder vs tar members), metric evaluation.

Everything is generated in a temporary folder (nothing is downloaded). Rows:
- ``read_gldv2_csv``: rows/s of the validating CSV reader (Arrow path for well-formed files,
  and the row-by-row parser that names bad lines, used when a check fails);
- ``gldv2_manifest``: CSV to manifest table (ids, landmark ids, folder-layout URIs);
- ``read_image_bytes folder`` / ``tar (cached index)``: small JPEGs read one by one, the tar
  path with its per-process member index (the one-off index scan is its own row);
- ``revisitop evaluate``: the real ROxford ground truth, full and top-100 rankings.

Usage: python bench/data_io.py [--rows 200000] [--images 2000]
"""
from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
from pathlib import Path

import cv2
import numpy as np

from cvnet.data.gldv2 import CSV_SPECS, gldv2_manifest, member_name, parse_gldv2_csv, read_gldv2_csv
from cvnet.data.manifest import clear_tar_cache, read_image_bytes, tar_index, tar_member_uri
from cvnet.data.revisitop import load_ground_truth
from cvnet.eval.revisitop import evaluate
from timing import measure  # bench/timing.py

GND = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "revisitop" / "gnd_roxford5k.pkl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cvnet-bench-"))
    rows: list[tuple[str, int, float]] = []
    try:
        csv_path = tmp / "train.csv"
        with open(csv_path, "w") as f:
            f.write("id,url,landmark_id\n")
            for i in range(args.rows):
                f.write(f"{i:016x},https://example.invalid/{i:016x}.jpg,{i % 81313}\n")
        rows.append(("read_gldv2_csv train.csv (Arrow path)", args.rows, measure(lambda: read_gldv2_csv(str(csv_path)), 1).wall))

        def row_by_row() -> None:
            with open(csv_path, newline="") as stream:
                parse_gldv2_csv(stream, str(csv_path), CSV_SPECS["train.csv"])
        rows.append(("parse_gldv2_csv (row by row, error path)", args.rows, measure(row_by_row, 1).wall))
        rows.append(("gldv2_manifest train, folder layout", args.rows,
                     measure(lambda: gldv2_manifest(str(tmp), "train", "folder"), 1).wall))

        ids = [f"{i * 7919:016x}"[::-1] for i in range(args.images)]
        blob = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes()
        for image_id in ids:
            path = tmp / "train" / member_name(image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        shard = tmp / "images_000.tar"
        with tarfile.open(shard, "w") as tar:
            for image_id in ids:
                tar.add(tmp / "train" / member_name(image_id), arcname=member_name(image_id))
        folder_uris = [str(tmp / "train" / member_name(i)) for i in ids]
        tar_uris = [tar_member_uri(str(shard), member_name(i)) for i in ids]
        rows.append(("read_image_bytes folder", len(ids), measure(lambda: [read_image_bytes(u) for u in folder_uris], 1).wall))
        clear_tar_cache()
        rows.append(("tar index scan (once per shard)", len(ids), measure(lambda: tar_index(str(shard)), 1).wall))
        rows.append(("read_image_bytes tar (cached index)", len(ids), measure(lambda: [read_image_bytes(u) for u in tar_uris], 1).wall))

        gt = load_ground_truth(str(GND))
        scores = np.random.default_rng(0).random((len(gt["imlist"]), len(gt["qimlist"])))
        ranks = np.argsort(-scores, axis=0)
        rows.append(("revisitop evaluate full (4993 x 70)", 70, measure(lambda: evaluate(ranks, gt), 1).wall))
        rows.append(("revisitop evaluate top-100 (100 x 70)", 70, measure(lambda: evaluate(ranks[:100], gt), 1).wall))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"| {'operation':<40} | {'items':>8} | {'seconds':>8} | {'items/s':>10} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for name, n, seconds in rows:
        print(f"| {name:<40} | {n:>8} | {seconds:>8.3f} | {n / seconds:>10.0f} |")


if __name__ == "__main__":
    main()

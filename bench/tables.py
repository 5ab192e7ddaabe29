"""Committed tables (Lance) vs the former layout (Parquet parts of 64 rows plus one commit object
per shard), side by side on the same data.

Rerank features of ``--images`` images with 48x64 stage-3 maps (three pyramid levels, fp16,
about 2.8 MB per image): bytes per image on disk, a random take of 100 ids, a full scan of the
levels; then the latency of committing one shard, on a local disk and on a moto S3 server.

The Parquet side is measured at its best: a take reads only the row groups holding the ids
(found from an id index), where the former reader read every committed file.

    python bench/tables.py [--images 2000] [--take 100] [--shards 20] [--dir /tmp/x]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import measure  # noqa: E402
from cvnet import features, storage, tables  # noqa: E402
from cvnet.models.correlation import pyramid_sizes  # noqa: E402

PART_ROWS = 64  # rows per Parquet part (= row group) in the former layout
CHUNK = 100  # images generated and written per call


def levels(rng: np.random.Generator, h: int = 48, w: int = 64) -> list[np.ndarray]:
    return [rng.standard_normal((256, a, b), dtype=np.float32) for a, b in pyramid_sizes(h, w)]


def chunk_table(start: int, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed + start)
    rows = [{"image_id": f"img{i:07d}", "uri": f"/data/img{i:07d}.jpg", "landmark_id": i % 100}
            for i in range(start, start + n)]
    X = rng.standard_normal((n, features.DESCRIPTOR_DIM), dtype=np.float32)
    return features.features_table(rows, X, float16=True, levels=[levels(rng) for _ in range(n)])


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- the two layouts -------------------------------------------------------------------------

def write_lance(root: str, images: int, seed: int) -> str:
    schema = features.features_schema(float16=True, rerank_features=True)
    uri = storage.join(root, "features.lance")
    lease = tables.Lease(root, "bench").acquire()
    writer = tables.TableWriter(tables.open_or_create(uri, schema, "features", "image_id", {}), lease)
    for start in range(0, images, CHUNK):
        chunk = chunk_table(start, min(CHUNK, images - start), seed)
        writer.commit(tables.write_table_fragments(uri, chunk), chunk.column("image_id").to_pylist())
    lease.release()
    return uri


def write_parquet(root: Path, images: int, seed: int) -> dict[str, tuple[str, int]]:
    """Parts of 64 rows; returns the id index (file, row group) a best-case reader would keep."""
    index = {}
    for start in range(0, images, CHUNK):
        chunk = chunk_table(start, min(CHUNK, images - start), seed)
        for offset in range(0, chunk.num_rows, PART_ROWS):
            part = chunk.slice(offset, PART_ROWS)
            path = root / f"part-{start + offset:07d}.parquet"
            pq.write_table(part, path, row_group_size=PART_ROWS)
            index.update({i: (str(path), 0) for i in part.column("image_id").to_pylist()})
    return index


def take_parquet(index: dict[str, tuple[str, int]], ids: list[str]) -> pa.Table:
    groups: dict[tuple[str, int], list[str]] = {}
    for i in ids:
        groups.setdefault(index[i], []).append(i)
    out = []
    for (path, group), wanted in groups.items():
        rows = pq.ParquetFile(path).read_row_group(group)
        out.append(rows.filter(pa.compute.is_in(rows.column("image_id"), pa.array(wanted))))
    return pa.concat_tables(out)


def scan_lance(uri: str) -> int:
    return sum(b.nbytes for b in tables.Table.open(uri).dataset.to_batches(columns=["level_0", "level_1", "level_2"]))


def scan_parquet(root: Path) -> int:
    return sum(pq.read_table(p, columns=["level_0", "level_1", "level_2"]).nbytes for p in sorted(root.glob("*.parquet")))


# ---- commit latency --------------------------------------------------------------------------

def commit_latency_lance(root: str, shards: int) -> float:
    schema = features.features_schema(float16=True)
    uri = storage.join(root, "lat.lance")
    lease = tables.Lease(root, "bench").acquire()
    writer = tables.TableWriter(tables.open_or_create(uri, schema, "features", "image_id", {}), lease)
    spent = 0.0
    for s in range(shards):
        rows = chunk_table(s * 8, 8, 0).select(schema.names)
        fragments = tables.write_table_fragments(uri, rows)
        start = time.perf_counter()
        writer.commit(fragments, rows.column("image_id").to_pylist())
        spent += time.perf_counter() - start
    lease.release()
    return spent / shards


def commit_latency_parquet(root: str, shards: int) -> float:
    """The former protocol: parts written, then per shard a HEAD of each part and one create-only
    commit object."""
    spent = 0.0
    fs, _ = storage.filesystem(root)
    for s in range(shards):
        rows = chunk_table(s * 8, 8, 0).select(features.features_schema(float16=True).names)
        sink = io.BytesIO()
        pq.write_table(rows, sink)
        part = storage.join(root, "_attempts", "a", f"shard-{s:05d}", "descriptors-0.parquet")
        storage.put_atomic(part, sink.getvalue())
        start = time.perf_counter()
        assert fs.exists(storage.filesystem(part)[1])
        body = json.dumps({"shard": s, "files": {"descriptors": [part]}, "rows": {"descriptors": 8}}).encode()
        storage.put_atomic(storage.join(root, "_commits", f"shard-{s:05d}.json"), body, exclusive=True)
        spent += time.perf_counter() - start
    return spent / shards


def moto_root() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    import boto3

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=5671, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:5671"
    boto3.client("s3").create_bucket(Bucket="bench")
    return server, "s3://bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--take", type=int, default=100)
    parser.add_argument("--shards", type=int, default=20, help="shards committed for the latency rows")
    parser.add_argument("--dir", default=None, help="scratch folder (default a temp dir; needs ~2x 5.6 GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="cvnet-bench-tables-"))
    lance_root, parquet_root = scratch / "lance", scratch / "parquet"
    parquet_root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        uri = write_lance(str(lance_root), args.images, args.seed)
        write_lance_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = write_parquet(parquet_root, args.images, args.seed)
        write_parquet_s = time.perf_counter() - t0
        ids = list(np.random.default_rng(1).choice(sorted(index), args.take, replace=False))
        table = tables.Table.open(uri)
        take_l = measure(lambda: table.take(ids), repeats=3)
        take_p = measure(lambda: take_parquet(index, ids), repeats=3)
        assert take_l.result.column("level_0").equals(take_p.result.sort_by([("image_id", "ascending")])
                                                       .take(np.argsort(np.argsort(ids))).column("level_0"))
        scan_l = measure(lambda: scan_lance(uri), repeats=1)
        scan_p = measure(lambda: scan_parquet(parquet_root), repeats=1)
        n = args.images
        print(f"\nrerank features of {n} images at 48x64 (fp16), load {os.getloadavg()[0]:.1f}\n")
        print(f"| layout | bytes/image | write img/s | take {args.take} ids (s) | take MiB peak | full scan MB/s |")
        print("|---|--:|--:|--:|--:|--:|")
        for name, size, wsec, take, scan in (
                ("Lance table (cvnet.tables)", folder_bytes(lance_root), write_lance_s, take_l, scan_l),
                ("Parquet parts of 64 rows, best case", folder_bytes(parquet_root), write_parquet_s, take_p, scan_p)):
            print(f"| {name} | {size / n:,.0f} | {n / wsec:.1f} | {take.wall:.3f} | {take.peak_mib:.0f} | "
                  f"{scan.result / scan.wall / 1e6:.0f} |")
        print(f"\ntake ratio (Parquet best case / Lance): {take_p.wall / take_l.wall:.1f}x; the former reader "
              f"read all {n} rows to take any.")
        shutil.rmtree(lance_root)
        shutil.rmtree(parquet_root)
        local = (commit_latency_lance(str(scratch / "lat"), args.shards),
                 commit_latency_parquet(str(scratch / "latp"), args.shards))
        server, bucket = moto_root()
        try:
            s3 = (commit_latency_lance(f"{bucket}/lat", args.shards),
                  commit_latency_parquet(f"{bucket}/latp", args.shards))
        finally:
            server.stop()
        print(f"\ncommit latency per shard ({args.shards} shards of 8 rows), ms\n")
        print("| store | Lance commit | Parquet: HEAD parts + commit object |")
        print("|---|--:|--:|")
        print(f"| local disk | {local[0] * 1e3:.1f} | {local[1] * 1e3:.1f} |")
        print(f"| moto S3 server | {s3[0] * 1e3:.1f} | {s3[1] * 1e3:.1f} |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

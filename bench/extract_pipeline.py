"""Images/s of extraction: (a) a plain single-process loop, one image at a time, 3 scales (the
reference's approach) and (b) the Ray Data pipeline on the same cores, with 1..N model actors.

    .venv/bin/python bench/extract_pipeline.py --images 48 --size 160 --cpus 2

Both read JPEGs from disk and load the same synthetic-weight R50 checkpoint; (b) includes actor
start-up, model loading and the shard commits, not the Ray cluster start. Prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.ray_runtime import LOCAL_RAY_ENV  # noqa: E402  (after the path insert)

for key, value in {**LOCAL_RAY_ENV, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(key, value)


def make_set(folder: Path, n: int, size: int) -> str:
    import cv2
    import numpy as np
    import pyarrow as pa

    from cvnet.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = (size, size * 4 // 3) if i % 2 else (size * 4 // 3, size)  # two size buckets
        image = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (9, 9), 0)
        cv2.imwrite(str(folder / f"{i}.jpg"), image)
        rows.append({"image_id": str(i), "uri": str(folder / f"{i}.jpg"), "landmark_id": 0, "split": "bench"})
    write_manifest(pa.Table.from_pylist(rows), str(folder / "manifest.parquet"))
    return str(folder / "manifest.parquet")


def plain_loop(manifest: str, model_uri: str, threads: int) -> tuple[float, int]:
    import torch

    from cvnet.data.images import decode_image
    from cvnet.data.manifest import read_image_bytes, read_manifest
    from cvnet.models.checkpoints import load_model

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_model(model_uri)
    rows = read_manifest(manifest).to_pylist()
    for row in rows:
        model.global_descriptor([decode_image(read_image_bytes(row["uri"]), row["image_id"])])
    return time.perf_counter() - start, len(rows)


def pipeline(manifest: str, model_uri: str, output: str, actors: int, threads: int, cpus: int) -> tuple[float, int]:
    from cvnet.config import ExtractConfig
    from pipelines.extract import run_extract

    cfg = ExtractConfig(manifest=manifest, model=model_uri, output=output, shard_size=16,
                        num_actors=actors, actor_cpus=min(1.0, (cpus - 0.5) / actors),
                        torch_threads=threads, batch_size=8, part_rows=8)
    start = time.perf_counter()
    result = run_extract(cfg)
    return time.perf_counter() - start, result.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=160, help="short side of the images, pixels")
    parser.add_argument("--cpus", type=int, default=2, help="cores for both modes")
    parser.add_argument("--loop-threads", type=int, nargs="+", default=None,
                        help="torch threads of the plain loop (default: 1 and --cpus; the best is the baseline)")
    args = parser.parse_args()

    import ray

    from cvnet.models.checkpoints import save_checkpoint
    from cvnet.models.cvnet import CVNet
    from cvnet.models.synthetic_weights import synthetic_state_dict

    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    manifest = make_set(work, args.images, args.size)
    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 0))
    save_checkpoint(model, str(work / "model.pt"))
    del model

    rows = []
    for threads in args.loop_threads or sorted({1, args.cpus}):  # the best one is the baseline
        seconds, n = plain_loop(manifest, str(work / "model.pt"), threads)
        rows.append(("(a) plain loop, 1 image/call", 0, threads, n, seconds, n / seconds))
    base = max(row[-1] for row in rows)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for actors in sorted({1, args.cpus}):
            threads = max(1, args.cpus // actors)
            seconds, n = pipeline(manifest, str(work / "model.pt"), str(work / f"out-{actors}"),
                                  actors, threads, args.cpus)
            rows.append(("(b) Ray pipeline", actors, threads, n, seconds, n / seconds))
    finally:
        ray.shutdown()

    load = os.getloadavg()[0]
    print(f"\nextraction, R50, {args.images} images of {args.size}x{args.size * 4 // 3} px, "
          f"3 scales, {args.cpus} CPUs ({os.cpu_count()} cores on the machine, load average {load:.1f})")
    print("| mode | actors | torch threads/actor | images | seconds | images/s | vs best (a) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, actors, threads, n, seconds, rate in rows:
        print(f"| {mode} | {actors or '-'} | {threads} | {n} | {seconds:.1f} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()

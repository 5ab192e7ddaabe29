"""Hard-negative mining speed: faiss k'+filter vs numpy blocks vs cvnet.search, side by side.

Every image is a query against every image (all-vs-all), excluding its own landmark and itself:
(a) faiss ``IndexFlatIP`` in one process with k' = k + the largest class + 1, then the same-class
    and self hits dropped (the common recipe; also scored as if k' were capped at faiss-GPU's 2048);
(b) numpy fp32 blocks: a block of queries against the whole gallery, the excluded pairs masked,
    top-k by (score, id) with ``partition`` (the definition, written plainly);
(c) ours, ``cvnet.search.search`` in this process (``run_ours``), and ``cvnet mine`` itself
    (``pipelines.mine.run_mine``: Ray Data actors on query shards, the gallery in the object
    store, the table committed) at 1 and 2 actors sharing the same cores; the features table is
    written first, outside the timing. Peak MiB of an actor row: the largest peak RSS of an actor
    process (it counts the object-store gallery pages the actor touched, shared by all actors).
The reference for the mismatch counts: (b)'s top k + 16 re-scored in numpy float64 (rounded to
float32) and sorted by (score, id), the order that cvnet.search defines.
All rows run here on the same cores, one after another. Peak MiB is the process's peak RSS growth
during the call (bench/timing.py). Then the projected time for GLDv2-clean (1.58 M x 1.58 M) from
the measured FLOP rate. Usage: python bench/mine.py [--n 20000] [--d 2048] [--k 10] [--largest-class 2500]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import threadpoolctl
import torch

from cvnet.search import PRECISIONS, Descriptors, TopK, plan_tiles, recall_at_k, search
from timing import measure

FAISS_GPU_MAX_K = 2048
GLDV2_CLEAN = 1_580_470
ASSUMED_GPU = {"fp32": 50e12, "bf16": 700e12}  # H100-class dense FLOP/s, sustained by the GEMM


def make_data(n: int, d: int, largest_class: int, seed: int) -> Descriptors:
    """Unit descriptors clustered by landmark: one landmark of ``largest_class`` images, the rest
    in landmarks of ~20 images, 3% without a landmark; ids shuffled against the row order."""
    rng = np.random.default_rng(seed)
    landmarks = rng.integers(1, max(2, n // 20), n)
    landmarks[rng.choice(n, largest_class, replace=False)] = 0
    landmarks[(rng.random(n) < 0.03) & (landmarks != 0)] = -1
    x = rng.standard_normal((n, d), dtype=np.float32)
    centres = rng.standard_normal((landmarks.max() + 1, d), dtype=np.float32)
    x += 1.5 * centres[np.maximum(landmarks, 0)] * (landmarks >= 0)[:, None]  # no landmark: no centre
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return Descriptors(x, np.array([f"{i:08x}" for i in rng.permutation(n)]), landmarks)


def excluded(data: Descriptors, rows: slice) -> np.ndarray:
    """(block, n) mask of the pairs mining skips: same landmark, or the image itself."""
    lm = data.landmarks
    mask = (lm[rows, None] == lm[None, :]) & (lm[rows, None] >= 0)
    mask[np.arange(mask.shape[0]), np.arange(len(lm))[rows]] = True
    return mask


def run_faiss(data: Descriptors, k: int, k_prime: int, threads: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(a) raw faiss top-k' of every image (scores, row indices), in query blocks."""
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(data.vectors.shape[1])
    index.add(data.vectors)
    parts = [index.search(data.vectors[start:start + block], k_prime) for start in range(0, len(data.ids), block)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def filter_faiss(data: Descriptors, raw: tuple[np.ndarray, np.ndarray], k: int, cap: int | None = None) -> TopK:
    """Drop same-landmark and self hits from faiss' top-k' (only its first ``cap`` columns)."""
    scores, index = raw[0][:, :cap], raw[1][:, :cap]
    lm = data.landmarks
    drop = ((lm[index] == lm[:, None]) & (lm[:, None] >= 0)) | (index == np.arange(len(lm))[:, None]) | (index < 0)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept hits first, in faiss' order
    kept = ~np.take_along_axis(drop, order, 1)
    ids = np.where(kept, data.ids[np.take_along_axis(index, order, 1)], "")
    return TopK(data.ids, ids, np.where(kept, np.take_along_axis(scores, order, 1), -np.inf).astype(np.float32),
                pairs=len(lm) ** 2)


def run_numpy(data: Descriptors, k: int, threads: int, block: int) -> TopK:
    """(b) numpy fp32 blocks: scores, mask, partition, then (score desc, id asc) per row."""
    n, x = len(data.ids), data.vectors
    ids, scores = np.full((n, k), "", dtype=data.ids.dtype), np.full((n, k), -np.inf, np.float32)
    with threadpoolctl.threadpool_limits(threads):
        for start in range(0, n, block):
            rows = slice(start, min(start + block, n))
            s = x[rows] @ x.T
            s[excluded(data, rows)] = -np.inf
            kth = np.partition(s, n - k, axis=1)[:, n - k]
            for r, row in enumerate(s):
                c = np.flatnonzero((row >= kth[r]) & (row > -np.inf))
                c = c[np.lexsort((data.ids[c], -row[c]))][:k]
                ids[start + r, : len(c)], scores[start + r, : len(c)] = data.ids[c], row[c]
    return TopK(data.ids, ids, scores, pairs=n * n)


def exact_reference(data: Descriptors, candidates: TopK, k: int) -> TopK:
    """``candidates`` re-scored in float64 (rounded to float32), best ``k`` by (score, id)."""
    rows = {i: r for r, i in enumerate(data.ids)}
    index = np.vectorize(lambda i: rows.get(i, -1))(candidates.ids)
    x = data.vectors.astype(np.float64)
    scores = np.concatenate([np.einsum("qd,qcd->qc", x[r:r + 512], x[np.maximum(index[r:r + 512], 0)])
                             for r in range(0, len(x), 512)]).astype(np.float32)  # 512 rows: ~200 MiB
    scores[index < 0] = -np.inf
    order = np.array([np.lexsort((ids, -row))[:k] for ids, row in zip(candidates.ids, scores)])
    return TopK(data.ids, np.take_along_axis(candidates.ids, order, 1), np.take_along_axis(scores, order, 1))


def run_ours(queries: Descriptors, gallery: Descriptors, k: int, threads: int, precision: str = "fp32") -> TopK:
    """(c) cvnet.search on ``threads`` torch threads (one actor's work on its query shard)."""
    torch.set_num_threads(threads)
    return search(queries, gallery, k, precision=precision)


def _actor_peaks(stop: threading.Event, peaks: dict[int, float]) -> None:
    """Poll the peak RSS (VmHWM, MiB) of every MineActor process until ``stop``."""
    while not stop.wait(0.2):
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if b"MineActor" in Path(f"/proc/{entry}/cmdline").read_bytes():
                    status = Path(f"/proc/{entry}/status").read_text()
                    peaks[int(entry)] = int(status.split("VmHWM:")[1].split()[0]) / 1024
            except (OSError, IndexError):
                continue


def run_ray(data: Descriptors, k: int, actors: int, threads: int, features_uri: str) -> tuple[TopK, float, float]:
    """(c) ``cvnet mine`` on ``actors`` Ray actors of ``threads // actors`` cores each:
    (result in ``data`` order, wall seconds, peak MiB of the largest actor)."""
    from cvnet import mining
    from cvnet.config import MineConfig
    from cvnet.tables import Table
    from pipelines.mine import run_mine

    output = tempfile.mkdtemp(prefix="bench-mine-")
    cfg = MineConfig(features=features_uri, output=output, keep=k, k=k, num_actors=actors,
                     actor_cpus=max(1, threads // actors), query_rows=1024, shard_size=8192)
    stop, peaks = threading.Event(), {}
    poller = threading.Thread(target=_actor_peaks, args=(stop, peaks), daemon=True)
    poller.start()
    started = time.perf_counter()
    run_mine(cfg)
    wall = time.perf_counter() - started
    stop.set()
    poller.join()
    rows = Table.open(os.path.join(output, mining.TABLE)).take(list(data.ids))
    result = mining.stored_topk(list(data.ids), rows.column("negative_ids").to_pylist(),
                                rows.column("negative_scores").to_pylist(), k)
    return result, wall, max(peaks.values(), default=float("nan"))


def write_features(data: Descriptors, folder: str) -> str:
    """``data`` as a committed features table (what ``cvnet extract`` would have written)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from mine_data import write_features as write

    write(folder, list(data.ids), data.vectors, list(data.landmarks))
    return folder


def gemm_rate(data: Descriptors, threads: int, precision: str, rows: int = 1024) -> float:
    """FLOP/s of the bare tile matmuls of (c) (``rows`` queries against the whole gallery, default
    tiles, no exclusions, no top-k), measured right after the (c) row to share its machine load."""
    torch.set_num_threads(threads)
    dtype = PRECISIONS[precision]
    x = torch.from_numpy(data.vectors)
    tiles = plan_tiles(rows, len(x), x.shape[1], 18, precision=precision)
    queries, out = x[:rows].to(dtype), torch.empty(rows, tiles.gallery, dtype=dtype)

    def tiles_only() -> None:
        for start in range(0, len(x), tiles.gallery):
            block = x[start:start + tiles.gallery].to(dtype)
            torch.matmul(queries, block.T, out=out[:, : len(block)])
    return 2 * rows * len(x) * x.shape[1] / measure(tiles_only, 2).wall


def mismatches(result: TopK, truth: TopK) -> tuple[int, float]:
    """Rows whose id list differs from the reference, and the largest score difference."""
    same = result.ids == truth.ids
    both = np.isfinite(result.scores) & np.isfinite(truth.scores)
    return int((~same.all(axis=1)).sum()), float(np.abs(result.scores - truth.scores)[both].max(initial=0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="images (queries = gallery)")
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--largest-class", type=int, default=2500, help="images of the largest landmark")
    parser.add_argument("--threads", type=int, default=2, help="cores for (a), (b) and the widest (c) row")
    parser.add_argument("--block", type=int, default=2048, help="query block of (a) and (b)")
    parser.add_argument("--precisions", default="fp32,bf16", help="(c) modes; non-fp32 rows report recall@k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True,
                        help="also time cvnet mine on 1 and 2 Ray actors (needs --d 2048)")
    args = parser.parse_args()
    data = make_data(args.n, args.d, args.largest_class, args.seed)
    flop = 2 * args.d * args.n**2
    k_prime = args.k + args.largest_class + 1

    timed = {}
    raw = measure(lambda: run_faiss(data, args.k, k_prime, args.threads, args.block), 1, trim_heap=True)
    timed["a"] = (f"(a) faiss IndexFlatIP k'={k_prime} + filter", args.threads, raw.wall, raw.growth_mib,
                  filter_faiss(data, raw.result, args.k))
    capped = filter_faiss(data, raw.result, args.k, cap=FAISS_GPU_MAX_K)  # faiss' lists are sorted: a prefix
    raw = None
    b = measure(lambda: run_numpy(data, args.k + 16, args.threads, args.block), 1, trim_heap=True)
    timed["b"] = ("(b) numpy fp32 blocks", args.threads, b.wall, b.growth_mib,
                  TopK(data.ids, b.result.ids[:, : args.k], b.result.scores[:, : args.k]))
    reference = exact_reference(data, b.result, args.k)
    gemm = {}  # (precision, threads) -> bare tile-matmul FLOP/s
    for precision in args.precisions.split(","):
        for threads in sorted({1, args.threads}):
            c = measure(lambda: run_ours(data, data, args.k, threads, precision), 1, trim_heap=True)
            timed[(precision, threads)] = (f"(c) ours, {precision}", threads, c.wall, c.growth_mib, c.result)
            gemm[precision, threads] = gemm_rate(data, threads, precision)
    if args.d == 2048 and args.ray:
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        features_uri = write_features(data, tempfile.mkdtemp(prefix="bench-features-"))
        for actors in sorted({1, min(2, args.threads)}):
            result, wall, peak = run_ray(data, args.k, actors, args.threads, features_uri)
            timed[("ray", actors)] = (f"(c) cvnet mine, {actors} Ray actor(s) x {args.threads // actors} cores",
                                      args.threads, wall, peak, result)
        ray.shutdown()

    base_wall = timed["a"][2]
    print(f"\nall-vs-all mining, n={args.n}, d={args.d}, k={args.k}, largest landmark {args.largest_class} images; "
          f"{flop / 1e12:.2f} TFLOP per run\n")
    print("| method | threads | wall s | pairs/s | GFLOP/s | share of bare tile GEMM | peak MiB | vs (a) "
          "| rows != reference | max abs score diff | recall@k |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, (label, threads, wall, peak, result) in timed.items():
        rows, diff = mismatches(result, reference)
        share = f"{flop / wall / gemm[key]:.0%} of {gemm[key] / 1e9:.0f} GFLOP/s" if key in gemm else ""
        print(f"| {label} | {threads} | {wall:.2f} | {args.n**2 / wall:.3g} | {flop / wall / 1e9:.1f} | {share} | "
              f"{peak:.0f} | {base_wall / wall:.2f}x | {rows} | {diff:.1e} | {recall_at_k(result, reference):.4f} |")
    rows, _ = mismatches(capped, reference)
    print(f"| (a') same, k' capped at faiss-GPU's {FAISS_GPU_MAX_K} (not timed) | | | | | | | | {rows} | | "
          f"{recall_at_k(capped, reference):.4f} |")

    total = 2 * args.d * GLDV2_CLEAN**2
    print(f"\nProjected all-vs-all mining of GLDv2-clean ({GLDV2_CLEAN:,} x {GLDV2_CLEAN:,} x {args.d}, "
          f"{total:.2e} FLOP). CPU: the best per-core rate of ours measured above (rate / threads; this "
          "machine is shared, so a lower bound), scaled linearly in cores (query shards are independent; "
          "each actor holds the gallery or streams gallery blocks; the merge is O(Q k)). GPU: the assumed "
          "dense rate, GEMM-bound (on CPU the exclusions + top-k kept the share of the bare GEMM shown above).\n")
    print("| mode | CPU rate per core (measured) | 16 cores | 64 cores | 256 cores | GPU rate (assumed) | 1 H100-class GPU |")
    print("|---|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        rate = max(flop / wall / threads for key, (_, threads, wall, _, _) in timed.items() if key[0] == precision)
        hours = [total / (rate * cores) / 3600 for cores in (16, 64, 256)]
        gpu = ASSUMED_GPU.get(precision)
        print(f"| ours {precision} | {rate / 1e9:.0f} GFLOP/s | {hours[0]:.1f} h | {hours[1]:.1f} h | {hours[2]:.2f} h | "
              + (f"{gpu / 1e12:.0f} TFLOP/s | {total / gpu:.0f} s |" if gpu else "n/a | n/a |"))


if __name__ == "__main__":
    main()

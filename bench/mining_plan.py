"""Incremental mining plan: Arrow kernels vs the previous Python-dict plan, side by side.

A synthetic stored hard-negatives table of ``--rows`` rows x ``--negatives`` listed ids, all mined
at features version 1, and the features at version 2: the same images plus ``--new`` new ones,
a fraction ``--changed`` of them with a new URI and as many with a new landmark. Rows:
(a) the previous plan (commit 4ef75c8, kept here as the baseline): the stored table and the
    version-1 ``{image_id: uri}`` as Python dicts and lists;
(b) ``cvnet.mining.plan_update``: Arrow compute kernels and numpy row indices.
Each runs in a fresh child process (so neither inherits the other's heap or Arrow pool) on the
same data, one after the other; peak MiB is the child's peak RSS growth during the call
(bench/timing.py), against the Arrow size of the inputs. The two plans must be equal (checked).
Usage: python bench/mining_plan.py [--rows 200000] [--negatives 32] [--new 10000] [--changed 0.01]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from cvnet import mining
from timing import measure  # bench/timing.py

MODES = {"a": "(a) previous: Python dicts", "b": "(b) cvnet.mining.plan_update: Arrow"}


def make_tables(rows: int, negatives: int, new: int, changed: float, seed: int = 0) -> tuple[pa.Table, ...]:
    """(current features at version 2, stored rows mined at version 1, features at version 1)."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"{i:010x}" for i in rng.permutation(rows + new)])
    landmarks = rng.integers(0, max(1, (rows + new) // 20), rows + new)
    uris = np.char.add(np.char.add("s3://bucket/images/", ids), ".jpg")
    then = pa.table({"image_id": ids[:rows], "uri": uris[:rows]})
    n_changed = int(changed * rows)
    moved = rng.choice(rows, n_changed, replace=False)
    uris_now = uris.copy()
    uris_now[moved] = np.char.add(uris_now[moved], "?v2")
    landmarks_now = landmarks.copy()
    landmarks_now[rng.choice(rows, n_changed, replace=False)] += 1
    current = pa.table({"image_id": ids, "uri": uris_now, "landmark_id": landmarks_now})
    listed = ids[rng.integers(0, rows, rows * negatives)]
    offsets = pa.array(np.arange(0, rows * negatives + 1, negatives, dtype=np.int32))
    mined = pa.table({"image_id": ids[:rows], "landmark_id": landmarks[:rows],
                      "negative_ids": pa.ListArray.from_arrays(offsets, _string_array(listed)),
                      "mined_from_version": np.ones(rows, np.int64)})
    return current, mined, then


def _string_array(values: np.ndarray) -> pa.Array:
    array = pa.array(values, pa.string())
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def previous_plan(current: pa.Table, version: int, mined: pa.Table, previous: dict[int, pa.Table | None]) -> mining.Plan:
    """The plan as commit 4ef75c8 computed it (its ``_previous_uris`` made the dicts)."""
    previous = {v: None if t is None else dict(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist()))
                for v, t in previous.items()}
    ids = current.column("image_id").to_pylist()
    uris = current.column("uri").to_pylist()
    landmarks = current.column("landmark_id").to_pylist()
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    stored = mined.to_pydict()
    by_version: dict[int, list[int]] = {}
    for position, (image_id, at) in enumerate(zip(stored["image_id"], stored["mined_from_version"])):
        by_version.setdefault(at, []).append(position)
    remove = [i for i in stored["image_id"] if i not in row_of]
    done = {stored["image_id"][p] for p in by_version.pop(version, [])}
    full = set(ids) - set(stored["image_id"])
    incremental = {}
    for at, positions in sorted(by_version.items()):
        positions = [p for p in positions if stored["image_id"][p] in row_of]
        uri_then = previous.get(at)
        if uri_then is None:
            full.update(stored["image_id"][p] for p in positions)
            continue
        landmark_then = {stored["image_id"][p]: stored["landmark_id"][p] for p in positions}
        unchanged = {i for i, uri, lm in zip(ids, uris, landmarks)
                     if uri_then.get(i) == uri and i in landmark_then and landmark_then[i] == lm}
        rows = []
        for p in positions:
            image_id = stored["image_id"][p]
            if image_id in unchanged and all(n in unchanged for n in stored["negative_ids"][p]):
                rows.append(row_of[image_id])
            else:
                full.add(image_id)
        delta = np.array(sorted(row_of[i] for i in ids if i not in unchanged), dtype=np.int64)
        if rows:
            incremental[at] = (np.array(sorted(rows), dtype=np.int64), delta)
    return mining.Plan(version, len(ids), np.array(sorted(row_of[i] for i in full), dtype=np.int64), incremental,
                       remove, len(done))


def digest(plan: mining.Plan) -> str:
    """A hash of everything the plan holds."""
    h = hashlib.sha256(repr((plan.version, plan.gallery_size, plan.remove, plan.done)).encode())
    for array in (plan.full, *(a for v in sorted(plan.incremental) for a in (np.int64(v), *plan.incremental[v]))):
        h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return h.hexdigest()


def child(args: argparse.Namespace) -> None:
    current, mined, then = make_tables(args.rows, args.negatives, args.new, args.changed)
    plan = previous_plan if args.mode == "a" else mining.plan_update
    run = measure(lambda: plan(current, 2, mined, {1: then}), 1, trim_heap=True)
    print(json.dumps({"wall": run.wall, "growth_mib": run.growth_mib, "digest": digest(run.result),
                      "rows": run.result.rows, "full": len(run.result.full), "pairs": run.result.pairs,
                      "input_mib": (current.nbytes + mined.nbytes + then.nbytes) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="stored rows (mined at version 1)")
    parser.add_argument("--negatives", type=int, default=32, help="listed negatives per stored row")
    parser.add_argument("--new", type=int, default=10_000, help="images new at version 2")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction with a new URI (and with a new landmark)")
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # a child's one measurement
    args = parser.parse_args()
    if args.mode:
        return child(args)
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    a, b = results["a"], results["b"]
    print(f"stored table: {args.rows} rows x {args.negatives} negatives; features: +{args.new} new, "
          f"{args.changed:.0%} URIs and {args.changed:.0%} landmarks changed; Arrow inputs {b['input_mib']:.0f} MiB; "
          f"plan: {b['rows']} rows to mine, {b['full']} in full, {b['pairs']:.3g} pairs")
    print()
    print("| plan | wall s | peak MiB (RSS growth) | time vs (a) | memory vs (a) |")
    print("|---|---:|---:|---:|---:|")
    for mode, r in results.items():
        print(f"| {MODES[mode]} | {r['wall']:.2f} | {r['growth_mib']:.0f} | {r['wall'] / a['wall']:.2f} | "
              f"{r['growth_mib'] / max(a['growth_mib'], 1e-9):.2f} |")
    print()
    print(f"plans equal: {'yes' if a['digest'] == b['digest'] else 'NO'}")
    if a["digest"] != b["digest"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

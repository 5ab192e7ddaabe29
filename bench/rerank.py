"""Re-ranking speed: reference-structured pairs vs the fast exact path vs bf16, side by side.

(a) reference: per pair, the scale pyramid and its convs, the full 9 x hq x wq x hk x wk
    correlation, 4D interpolation and full center-pivot convs (the authors' structure);
(b) fast fp32: per-image RerankFeatures computed once (timed separately, not per pair), then
    match_probability batched over the candidates of one query;
(c) fast bf16: (b) under bf16 autocast (approximate; its score error against (a) is printed).

Peak memory is the process's peak RSS growth during the timed call (Linux VmHWM, reset via
/proc/self/clear_refs). ``--reuse-heap`` reruns the bench with glibc told to serve large blocks
from its heap (MALLOC_MMAP_MAX_=0): freed tensors are then reused instead of being returned to
the kernel and page-faulted (zeroed) again on the next allocation, a deployment setting for
rerank workers (peak MiB then only counts heap growth, an underestimate). Usage: python bench/rerank.py [--sizes 48x64,32x32] [--candidates 4] [--reuse-heap]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from cvnet.models.rerank import (
    CVLearner,
    compute_rerank_features,
    make_conv2ds,
    match_probability,
    match_probability_reference,
)
from cvnet.models.checkpoints import submodule_state
from cvnet.models.synthetic_weights import synthetic_state_dict
from timing import measure

HEAP_REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def load_weights(seed: int) -> tuple[torch.nn.ModuleList, CVLearner]:
    state = synthetic_state_dict("r50", seed)
    conv2ds, learner = make_conv2ds(), CVLearner()
    conv2ds.load_state_dict(submodule_state(state, "conv2ds."))
    learner.load_state_dict(submodule_state(state, "cv_learner."))
    return conv2ds.eval(), learner.eval()


def bench_size(h: int, w: int, args: argparse.Namespace, conv2ds, learner) -> list[tuple]:
    """Rows (mode, wall s / pair, CPU s / pair, peak MiB, max score diff vs (a)) for h x w maps."""
    gen = torch.Generator().manual_seed(h * 1000 + w)
    maps = [torch.randn(1024, h, w, generator=gen) for _ in range(args.candidates + 1)]
    query_map, key_maps = maps[0], maps[1:]
    n_ref = min(args.reference_pairs, len(key_maps))

    ref = measure(
        lambda: np.array([match_probability_reference(learner, conv2ds, query_map, k) for k in key_maps[:n_ref]]), 1
    )
    ref_scores, ref_wall, ref_cpu, ref_mem = ref.result, ref.wall, ref.cpu, ref.growth_mib
    rows = [("(a) reference, per pair", ref_wall / n_ref, ref_cpu / n_ref, ref_mem, 0.0)]
    feat = measure(lambda: [compute_rerank_features(m, conv2ds) for m in maps], 1)
    feats, feat_wall, feat_cpu = feat.result, feat.wall, feat.cpu
    for label, precision in (("(b) fast fp32", "fp32"), ("(c) fast bf16", "bf16")):
        fast = measure(
            lambda: match_probability(learner, feats[0], feats[1:], args.batch_size, precision), args.repeats
        )
        scores, wall, cpu, mem = fast.result, fast.wall, fast.cpu, fast.growth_mib
        err = float(np.abs(scores[:n_ref] - ref_scores).max())
        rows.append((f"{label}, {args.candidates} candidates", wall / args.candidates, cpu / args.candidates, mem, err))
    rows.append(("per-image features (once per image, per image)", feat_wall / len(maps), feat_cpu / len(maps), None, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="48x64,32x32", help="feature-map sizes hxw (both sides of a pair)")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per query for (b) and (c)")
    parser.add_argument("--reference-pairs", type=int, default=1, help="pairs timed for (a) (slow)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: match_probability's automatic size")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs for (b) and (c)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse-heap", action="store_true", help="rerun with MALLOC_MMAP_MAX_=0 (see above)")
    args = parser.parse_args()
    if args.reuse_heap and any(os.environ.get(k) != v for k, v in HEAP_REUSE_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **HEAP_REUSE_ENV})
    torch.set_num_threads(args.threads)
    conv2ds, learner = load_weights(seed=0)
    warm = compute_rerank_features(torch.randn(1024, 8, 8), conv2ds)
    match_probability(learner, warm, [warm])  # one-time oneDNN initialisation, not timed

    heap = "heap reuse (MALLOC_MMAP_MAX_=0)" if args.reuse_heap else "default glibc malloc"
    print(f"torch {torch.__version__}, {args.threads} threads, {heap}; CPU s = process CPU time (all threads)")
    print("| feature maps | mode | ms / pair | pairs / s | CPU s / pair | x (a) wall | x (a) CPU | peak MiB | max abs score diff vs (a) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes.split(","):
        h, w = (int(x) for x in size.split("x"))
        rows = bench_size(h, w, args, conv2ds, learner)
        _, ref_wall, ref_cpu, _, _ = rows[0]
        for mode, wall, cpu, mem, err in rows:
            tail = "| - | - | - | - |" if mem is None else (
                f"| {ref_wall / wall:.1f} | {ref_cpu / cpu:.1f} | {mem:.0f} | {err:.1e} |")
            print(f"| {size} vs {size} | {mode} | {wall * 1e3:.0f} | {1 / wall:.2f} | {cpu:.2f} {tail}")


if __name__ == "__main__":
    main()

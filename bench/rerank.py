"""Re-ranking speed: reference-structured pairs vs the fast exact path vs bf16, side by side.

(a) reference: per pair, the scale pyramid and its convs, the full 9 x hq x wq x hk x wk
    correlation, 4D interpolation and full center-pivot convs (the authors' structure: the oracle);
(b) fast fp32 (the default, exact): per-image RerankFeatures computed once, then
    match_probability batched over the candidates of one query;
(c) fast bf16 (opt-in, approximate): (b) under bf16 autocast.

Per pair times include the query's per-image features amortised over ``--amortise-k``
candidates (gallery features are computed once at extraction; the per-image row shows their
cost). Each mode runs under glibc's default heap and under cvnet's heap reuse
(``cvnet.models.heap``, the default of every model call; CPU only). "x released" divides the
released CVNet code's time per 48x64 pair on this machine (``--released-s``; without it,
estimated as ``--released-vs-a`` times (a) under the default heap: 3.60 / 2.2 = 1.64 on the
issue's machine) by that time. The error is the max abs score difference against (a). The
scaling table gives pairs/s for K candidates per query. Peak memory: the process's peak RSS
growth during the timed call (Linux VmHWM), or torch.cuda.max_memory_allocated on CUDA.
Usage: python bench/rerank.py [--sizes 48x64] [--candidates 8] [--scaling-ks 10,100,1000]
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from cvnet.models.checkpoints import submodule_state
from cvnet.models.rerank import (
    CVLearner,
    compute_rerank_features,
    make_conv2ds,
    match_probability,
    match_probability_reference,
)
from cvnet.models.synthetic_weights import synthetic_state_dict
from timing import HEAPS, heap_policy, machine_load, measure

MODES = (("(b) fast fp32", "fp32"), ("(c) fast bf16", "bf16"))


def load_weights(seed: int, device: str) -> tuple[torch.nn.ModuleList, CVLearner]:
    state = synthetic_state_dict("r50", seed)
    conv2ds, learner = make_conv2ds(), CVLearner()
    conv2ds.load_state_dict(submodule_state(state, "conv2ds."))
    learner.load_state_dict(submodule_state(state, "cv_learner."))
    return conv2ds.eval(), learner.to(device).eval()


def random_maps(h: int, w: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(h * 1000 + w)
    return [torch.randn(1024, h, w, generator=gen) for _ in range(n)]


def bench_size(h: int, w: int, args: argparse.Namespace, conv2ds, learner) -> list[tuple]:
    """Rows (mode, heap, s / pair, CPU s / pair, peak MiB, max score diff vs (a)) for h x w maps;
    the first row is (a) under the first heap."""
    maps = random_maps(h, w, args.candidates + 1)
    query_map, key_maps = maps[0], maps[1:]
    n_ref = min(args.reference_pairs, len(key_maps))
    cuda = args.device == "cuda"
    heaps = HEAPS if args.device == "cpu" else ("heap reuse",)
    cuda_conv2ds = conv2ds.to(args.device)
    rows, reference = [], None
    for heap in heaps:
        with heap_policy(heap):
            ref = measure(lambda: np.array([
                match_probability_reference(learner, cuda_conv2ds, query_map.to(args.device), k.to(args.device))
                for k in key_maps[:n_ref]]), args.repeats, cuda=cuda)
        reference = ref.result if reference is None else reference
        rows.append(("(a) reference, per pair", heap, ref.wall / n_ref, ref.cpu / n_ref, _peak(ref, cuda),
                     float(np.abs(ref.result - reference).max())))
    conv2ds.cpu()
    feat = measure(lambda: [compute_rerank_features(m, conv2ds) for m in maps], 1)
    feats, per_image = feat.result, feat.wall / len(maps)
    for (label, precision), heap in itertools.product(MODES, heaps):
        with heap_policy(heap):
            fast = measure(lambda: match_probability(learner, feats[0], feats[1:], args.batch_size, precision),
                           args.repeats, cuda=cuda)
        err = float(np.abs(fast.result[:n_ref] - reference).max())
        per_pair = fast.wall / args.candidates + per_image / args.amortise_k
        rows.append((f"{label}, batches of {args.candidates}", heap, per_pair, fast.cpu / args.candidates,
                     _peak(fast, cuda), err))
    rows.append(("per-image features (once per image)", "heap reuse", per_image, feat.cpu / len(maps), None, None))
    return rows


def _peak(m, cuda: bool) -> float:
    return m.gpu_peak_mib if cuda else m.growth_mib


def scaling_rows(args: argparse.Namespace, learner, conv2ds) -> list[tuple[int, str, float]]:
    """(K, precision, pairs / s) for one query against K candidates of --scaling-size maps."""
    h, w = (int(x) for x in args.scaling_size.split("x"))
    feats = [compute_rerank_features(m, conv2ds) for m in random_maps(h, w, 9)]
    rows = []
    for k, (_, precision) in itertools.product((int(x) for x in args.scaling_ks.split(",")), MODES):
        keys = [feats[1 + i % 8] for i in range(k)]
        run = measure(lambda: match_probability(learner, feats[0], keys, args.batch_size, precision),
                      args.repeats, cuda=args.device == "cuda")
        rows.append((k, precision, k / run.wall))
    return rows


def largest_batch(learner, conv2ds, size: str, precision: str, limit: int) -> int:
    """The most candidates of ``size`` maps that run as one CUDA batch (doubling until out of memory)."""
    h, w = (int(x) for x in size.split("x"))
    query, key = (compute_rerank_features(m, conv2ds) for m in random_maps(h, w, 2))
    fits, k = 0, 1
    while k <= limit:
        try:
            match_probability(learner, query, [key] * k, batch_size=k, precision=precision)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        fits, k = k, 2 * k
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="48x64", help="feature-map sizes hxw (both sides of a pair)")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per query for (b) and (c)")
    parser.add_argument("--reference-pairs", type=int, default=1, help="pairs timed for (a) (slow)")
    parser.add_argument("--amortise-k", type=int, default=100, help="candidates the query's features are shared by")
    parser.add_argument("--released-s", type=float, default=None, help="released code's s / 48x64 pair on this machine")
    parser.add_argument("--released-vs-a", type=float, default=3.60 / 2.2,
                        help="without --released-s: released code's time / (a)'s under the default heap")
    parser.add_argument("--scaling-ks", default="10,100,1000", help="K for the scaling table ('' to skip)")
    parser.add_argument("--scaling-size", default="24x32", help="map size of the scaling table")
    parser.add_argument("--batch-size", type=int, default=None, help="default: match_probability's automatic size")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs of every timed call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-batch-limit", type=int, default=0,
                        help="CUDA: find the largest one-batch K up to this (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    conv2ds, learner = load_weights(seed=0, device=args.device)
    warm = compute_rerank_features(torch.randn(1024, 8, 8), conv2ds)
    for _, precision in MODES:
        match_probability(learner, warm, [warm], precision=precision)  # one-time initialisation, not timed

    released = f"{args.released_s} s / pair" if args.released_s else f"{args.released_vs_a:.2f} x (a), default heap"
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads; {machine_load()}")
    print(f"per pair = batched time / K + query features / {args.amortise_k}; released code: {released}; "
          "CPU s = process CPU time (all threads)")
    print("| feature maps | mode | heap | ms / pair | pairs / s | CPU s / pair | x (a) | x released | peak MiB "
          "| max abs score diff vs (a) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes.split(","):
        h, w = (int(x) for x in size.split("x"))
        rows = bench_size(h, w, args, conv2ds, learner)
        ref_wall = rows[0][2]
        released_s = args.released_s or args.released_vs_a * ref_wall
        for mode, heap, wall, cpu, mem, err in rows:
            tail = "| - | - | - | - |" if mem is None else (
                f"| {ref_wall / wall:.1f} | {released_s / wall:.1f} | {mem:.0f} | {err:.1e} |")
            print(f"| {size} vs {size} | {mode} | {heap} | {wall * 1e3:.0f} | {1 / wall:.2f} | {cpu:.3f} {tail}")
    if args.scaling_ks:
        print(f"\nscaling, {args.scaling_size} maps, one query vs K candidates; {machine_load()}")
        print("| K | precision | pairs / s |")
        print("| ---: | --- | ---: |")
        for k, precision, rate in scaling_rows(args, learner, conv2ds):
            print(f"| {k} | {precision} | {rate:.1f} |")
    if args.max_batch_limit and args.device == "cuda":
        for _, precision in MODES:
            k = largest_batch(learner, conv2ds, args.sizes.split(",")[0], precision, args.max_batch_limit)
            print(f"largest K in one batch, {precision}: {k} (searched up to {args.max_batch_limit})")
    print(f"\nafter the run: {machine_load()}")


if __name__ == "__main__":
    main()

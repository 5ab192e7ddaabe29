"""Revisitop mAP and mP@k (Radenović et al. 2018), exact and safe on truncated rankings.

Definitions (SPEC §5): per protocol, junk images are removed from each query's ranking
(later positives move up); the j-th positive (0-based) at junk-adjusted 0-based rank r adds
``((j / r if r > 0 else 1) + (j + 1) / (r + 1)) / 2 / n_pos`` to AP; P@k divides the number of
positives at 1-based rank <= kq by ``kq = min(max(pos), k)``. Queries without positives are
left out of the means. On a full ranking this is the reference ``compute_map`` number for number
(computed without ``np.in1d``, removed in NumPy 2.4).

Truncated rankings (top-K only): positives that are not in the list count in ``n_pos`` and add
0 to AP (they rank somewhere after the list). For P@k they are taken as ranked after the list,
so ``kq = k`` as soon as one positive is missing, and a query with no positive in the list
scores P@k = 0 (the reference crashes there). Both are exact whenever the junk-free list holds
at least k images, and lower bounds otherwise.

Database indices beyond the ground truth's ``imlist`` (e.g. R1M distractors appended after the
database) are valid in a ranking and never positive or junk.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cvnet.data.revisitop import PROTOCOLS, check_ranks, gnd_entries, protocol_sets

DEFAULT_KS = (1, 5, 10)


def query_scores(column: np.ndarray, positives: np.ndarray, junk: np.ndarray,
                 ks: Sequence[int] = DEFAULT_KS) -> tuple[float, np.ndarray]:
    """AP and P@k of one ranked list (database indices, best first); NaNs if no positives."""
    if len(positives) == 0:
        return float("nan"), np.full(len(ks), np.nan)
    pos = np.flatnonzero(np.isin(column, positives))
    junk_pos = np.flatnonzero(np.isin(column, junk))
    rank = pos - np.searchsorted(junk_pos, pos, side="left")  # junk-adjusted, 0-based
    j = np.arange(len(rank), dtype=np.float64)
    before = np.divide(j, rank, out=np.ones_like(j), where=rank > 0)
    ap = float(np.sum((before + (j + 1) / (rank + 1)) / 2) / len(positives))
    missing = np.isin(np.unique(positives), column, invert=True).any()
    precisions = np.zeros(len(ks))
    if len(rank):
        rank1 = rank + 1
        for i, k in enumerate(ks):
            kq = k if missing else min(int(rank1.max()), k)
            precisions[i] = np.count_nonzero(rank1 <= kq) / kq
    return ap, precisions


def evaluate_per_query(ranks: np.ndarray, gnd: dict | list,
                       ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, np.ndarray]]:
    """Per-query scores: ``{protocol: {"ap": (n_q,), "p@k": (n_q,) ...}}``, NaN for empty queries."""
    entries = gnd_entries(gnd)
    ranks = check_ranks(ranks, len(entries))
    out: dict[str, dict[str, np.ndarray]] = {}
    for protocol in PROTOCOLS:
        aps = np.empty(len(entries))
        prs = np.empty((len(entries), len(ks)))
        for q, entry in enumerate(entries):
            positives, junk = protocol_sets(entry, protocol)
            aps[q], prs[q] = query_scores(ranks[:, q], positives, junk, ks)
        out[protocol] = {"ap": aps, **{f"p@{k}": prs[:, i] for i, k in enumerate(ks)}}
    return out


def evaluate(ranks: np.ndarray, gnd: dict | list, ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, float]]:
    """mAP and mP@k per protocol as fractions: ``{"easy"|"medium"|"hard": {"map", "mp@k"...}}``.

    ``ranks`` is ``(n_ranked, n_queries)`` database indices, full or truncated to the top K;
    ``gnd`` the loaded ground truth (dict) or its ``gnd`` list. A protocol with no scorable
    query gives NaN.
    """
    per_query = evaluate_per_query(ranks, gnd, ks)
    out: dict[str, dict[str, float]] = {}
    for protocol, scores in per_query.items():
        valid = ~np.isnan(scores["ap"])
        means = {"map": scores["ap"]} | {f"mp@{k}": scores[f"p@{k}"] for k in ks}
        out[protocol] = {key: float(values[valid].mean()) if valid.any() else float("nan")
                         for key, values in means.items()}
    return out


def format_results(results: dict[str, dict[str, float]]) -> str:
    """One line per protocol, in percent as papers report them."""
    return "\n".join(f"{p:<6} " + "  ".join(f"{k}={100 * v:.2f}" for k, v in scores.items())
                     for p, scores in results.items())


def format_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table of mAP (x100) per labelled result: Easy / Medium / Hard."""
    lines = ["| model | Easy mAP | Medium mAP | Hard mAP |", "| --- | --- | --- | --- |"]
    for name, res in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * res[p]['map']:.2f}" for p in PROTOCOLS) + " |")
    return "\n".join(lines)

"""GLDv2 retrieval mAP@100 (the Kaggle metric), Public and Private scored separately.

AP of a query = sum over the hits at 0-based rank i < 100 of (hits so far / (i + 1)), divided
by ``min(|GT|, 100)``; a repeated prediction counts once (later copies are skipped). Queries
whose solution is ``None`` (Usage ``Ignored``) are not scored; a scored query without a
prediction scores 0; each usage's mean divides by its number of scored queries.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

from cvnet.data.gldv2 import read_gldv2_csv

TOP_K = 100
USAGES = ("Public", "Private")


def average_precision_at_k(predicted: Sequence[str], relevant: set[str], k: int = TOP_K) -> float:
    """AP@k of one ranked prediction list against the set of relevant ids."""
    if not relevant:
        raise ValueError("AP@k is undefined for a query without relevant images")
    seen: set[str] = set()
    hits = 0
    total = 0.0
    rank = 0
    for image_id in predicted:
        if image_id in seen:
            continue
        seen.add(image_id)
        if rank >= k:
            break
        if image_id in relevant:
            hits += 1
            total += hits / (rank + 1)
        rank += 1
    return total / min(len(relevant), k)


def predictions_from_rankings(rankings: pa.Table) -> dict[str, list[str]]:
    """``{query id: index ids best first}`` from a rankings table (``query_id``, ``rank``, ``image_id``)."""
    missing = [c for c in ("query_id", "rank", "image_id") if c not in rankings.column_names]
    if missing:
        raise KeyError(f"rankings table lacks column(s) {missing}; has {rankings.column_names}")
    ordered = rankings.select(["query_id", "rank", "image_id"]).sort_by([("query_id", "ascending"),
                                                                          ("rank", "ascending")])
    out: dict[str, list[str]] = {}
    for query_id, image_id in zip(ordered["query_id"].to_pylist(), ordered["image_id"].to_pylist()):
        out.setdefault(query_id, []).append(image_id)
    return out


def _solution_rows(solution: pa.Table | str) -> list[tuple[str, list[str] | None, str]]:
    table = read_gldv2_csv(solution) if isinstance(solution, str) else solution
    return list(zip(*(table.column(c).to_pylist() for c in ("id", "images", "Usage"))))


def per_query_ap(predictions: Mapping[str, Sequence[str]],
                 solution: pa.Table | str, k: int = TOP_K) -> dict[str, dict[str, float]]:
    """``{usage: {query id: AP@k}}`` for every scored query of the solution."""
    rows = _solution_rows(solution)
    unknown = set(predictions) - {row[0] for row in rows}
    if unknown:
        raise KeyError(f"predictions for {len(unknown)} query id(s) not in the solution, "
                       f"e.g. {sorted(unknown)[:5]}")
    out: dict[str, dict[str, float]] = {usage: {} for usage in USAGES}
    for query_id, images, usage in rows:
        if images is None or usage not in out:
            continue
        out[usage][query_id] = average_precision_at_k(predictions.get(query_id, ()), set(images), k)
    return out


def map_at_100(predictions: Mapping[str, Sequence[str]], solution: pa.Table | str) -> dict[str, float]:
    """mAP@100 as fractions: ``{"Public": ..., "Private": ...}`` (NaN for a usage with no query).

    ``predictions`` maps a test id to its ranked index ids; ``solution`` is the table read from
    ``retrieval_solution_v2.1.csv`` (or its URI).
    """
    scores = per_query_ap(predictions, solution, TOP_K)
    return {usage: (sum(aps.values()) / len(aps) if aps else float("nan")) for usage, aps in scores.items()}

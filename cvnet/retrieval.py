"""Shortlist -> re-rank -> fuse: the retrieval of CVNet, shared by evaluation and the offline job.

1. **Global search** (:func:`global_search`): exact tiled inner-product top-``depth`` through
   :mod:`cvnet.search` (a query's own image excluded).
2. **Shortlist**: the first ``k`` of each query's list. Two rules (SPEC §4):
   - ``topk`` (deployment): the raw top-``k`` of the global ranking;
   - ``gt-aware`` (the paper's ROxford/RParis numbers): for one revisitop protocol, that protocol's
     junk images are removed from each query's global list (:func:`remove_junk`) before the first
     ``k`` are taken, so the ``k`` re-ranked candidates are ``k`` non-junk ones. The ranking is
     then specific to the protocol and is scored with that protocol only.
3. **Re-rank** (:func:`rerank_probabilities`): a :data:`ScoreFn` gives the match probabilities of
   one query against all its shortlisted candidates in one batched call (never per pair). The
   offline job goes candidate-major instead: :func:`key_major_probability` (of
   :mod:`cvnet.models.rerank`) scores one gallery image against all the
   queries that shortlisted it, in one batched call.
4. **Fuse** (:func:`fuse`): ``score = global + weight * p`` (``weight`` 0.5 in the paper) on the
   first ``k``, sorted by score (ties: global order); candidates beyond ``k`` keep their global
   order after them, with ``score = global`` and ``rerank_score`` null.

Rankings are the contract table of DESIGN.md (:data:`RANKINGS_SCHEMA`), one row per (query,
rank), ``rank`` 1-based. :func:`evaluate_rankings` scores them with revisitop mAP / mP@k; a list
may be top-K only (positives missing from it count as not retrieved).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch

from cvnet.data.revisitop import PROTOCOLS, Benchmark, gnd_entries, load_benchmark, protocol_sets
from cvnet.eval.revisitop import DEFAULT_KS, evaluate, evaluate_per_query
from cvnet.search import Descriptors, TopK, search

DEFAULT_WEIGHT = 0.5
DEFAULT_K = 100
SHORTLISTS = ("topk", "gt-aware")

RANKINGS_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("global_score", pa.float32(), nullable=False),
    pa.field("rerank_score", pa.float32()),
    pa.field("score", pa.float32(), nullable=False),
])

F = TypeVar("F")
ScoreFn = Callable[[Any, Sequence[Any]], np.ndarray]
"""``score(query_features, candidate_features) -> (len(candidates),)`` match probabilities."""


def global_search(queries: Descriptors, gallery: Descriptors, depth: int, **options: Any) -> TopK:
    """Exact global top-``depth`` of every query (``depth`` is capped by the gallery size);
    ``options`` go to :func:`cvnet.search.search`."""
    n = len(gallery.vectors)
    if n == 0:
        raise ValueError("gallery: no descriptors to search")
    return search(queries, gallery, min(depth, n), **options)


def remove_junk(ranking: TopK, junk: Sequence[Sequence[str] | set[str]]) -> TopK:
    """``ranking`` with ``junk[q]`` (image ids) removed from query ``q``'s list; later items move
    up, the freed places at the end are padding (``''`` / ``-inf``)."""
    if len(junk) != len(ranking.query_ids):
        raise ValueError(f"junk: {len(junk)} sets for {len(ranking.query_ids)} queries")
    ids = np.full_like(ranking.ids, "")
    scores = np.full_like(ranking.scores, -np.inf)
    for q, bad in enumerate(junk):
        keep = ~np.isin(ranking.ids[q], np.asarray(list(bad), dtype=str)) & (ranking.ids[q] != "")
        n = int(keep.sum())
        ids[q, :n], scores[q, :n] = ranking.ids[q, keep], ranking.scores[q, keep]
    return TopK(ranking.query_ids, ids, scores, ranking.pairs)


def protocol_junk(gt: dict, protocol: str, query_rows: Sequence[int] | None = None) -> list[set[str]]:
    """Per query (in ``query_rows`` order, default all), the image ids that are junk under a
    revisitop ``protocol`` (Easy: junk and hard; Medium: junk; Hard: junk and easy)."""
    entries, names = gnd_entries(gt), gt["imlist"]
    rows = range(len(entries)) if query_rows is None else query_rows
    return [{names[i] for i in protocol_sets(entries[q], protocol)[1]} for q in rows]


def rerank_probabilities(shortlist: TopK, k: int, score: ScoreFn, query_features: Mapping[str, F],
                         gallery_features: Mapping[str, F]) -> np.ndarray:
    """(Q, k') match probabilities of each query's first ``k' = min(k, shortlist.k)`` candidates,
    one batched ``score`` call per query; NaN at padding. Features are looked up by id."""
    k = min(k, shortlist.k)
    out = np.full((len(shortlist.query_ids), k), np.nan, dtype=np.float32)
    for q, query_id in enumerate(shortlist.query_ids):
        ids = [i for i in shortlist.ids[q, :k] if i != ""]
        if ids:
            out[q, :len(ids)] = _checked(score(query_features[str(query_id)], [gallery_features[i] for i in ids]),
                                         len(ids), str(query_id))
    return out


def _checked(p: np.ndarray, n: int, query_id: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float32).reshape(-1)
    if len(p) != n:
        raise ValueError(f"score for query {query_id!r}: {len(p)} probabilities for {n} candidates")
    return p


def fuse(ranking: TopK, probabilities: np.ndarray | None, weight: float = DEFAULT_WEIGHT) -> pa.Table:
    """The rankings table of ``ranking``: its first ``probabilities.shape[1]`` candidates per query
    re-ranked by ``global + weight * p`` (ties in global order), the rest after them in global
    order (``rerank_score`` null, ``score = global``). ``probabilities=None``: global order only."""
    n_q, depth = ranking.ids.shape
    k = 0 if probabilities is None else probabilities.shape[1]
    if probabilities is not None and (probabilities.shape[0] != n_q or k > depth):
        raise ValueError(f"probabilities of shape {probabilities.shape} do not fit a ranking of {n_q} x {depth}")
    p = np.full((n_q, depth), np.nan, dtype=np.float32)
    if k:
        p[:, :k] = probabilities
    present = ranking.ids != ""
    if k and np.isnan(p[:, :k][present[:, :k]]).any():
        raise ValueError("probabilities: NaN for a candidate of the shortlist")
    g = ranking.scores.astype(np.float32)
    fused = np.where(np.isnan(p), g, g + np.float32(weight) * p).astype(np.float32)
    position = np.broadcast_to(np.arange(depth), (n_q, depth))
    head = np.where(position < k, -fused, np.inf)  # re-ranked part first, by score; the rest by position
    order = np.lexsort((position, head, ~present), axis=1)  # padding last
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    ids, g, p, fused, present = take(ranking.ids), take(g), take(p), take(fused), take(present)
    ranks = np.cumsum(present, axis=1, dtype=np.int32)
    rows = np.repeat(np.asarray(ranking.query_ids, dtype=str), depth).reshape(n_q, depth)
    return pa.Table.from_arrays([
        pa.array(rows[present], pa.string()), pa.array(ranks[present], pa.int32()),
        pa.array(ids[present], pa.string()), pa.array(g[present], pa.float32()),
        pa.array(p[present], pa.float32(), mask=np.isnan(p[present])), pa.array(fused[present], pa.float32()),
    ], schema=RANKINGS_SCHEMA)


def retrieve(ranking: TopK, k: int, score: ScoreFn | None, query_features: Mapping[str, F] | None = None,
             gallery_features: Mapping[str, F] | None = None, weight: float = DEFAULT_WEIGHT,
             junk: Sequence[Sequence[str] | set[str]] | None = None) -> pa.Table:
    """Shortlist -> re-rank -> fuse in one call: the rankings table of a global ``ranking``, its
    first ``k`` re-ranked with ``score`` (``None``: global only). ``junk`` (per query) makes the
    shortlist GT-aware: those ids are removed from the list first."""
    if junk is not None:
        ranking = remove_junk(ranking, junk)
    if score is None:
        return fuse(ranking, None)
    if query_features is None or gallery_features is None:
        raise ValueError("retrieve: score needs query_features and gallery_features")
    return fuse(ranking, rerank_probabilities(ranking, k, score, query_features, gallery_features), weight)


def rankings_to_topk(rankings: pa.Table, query_ids: Sequence[str], column: str = "score",
                     order: str = "rank") -> TopK:
    """The rankings of ``query_ids`` (in that order) as a :class:`TopK` with the scores of
    ``column``, in ``rank`` order or, with ``order="global"``, in the global search's order
    (global score descending, then image id); shorter lists are padded. ``KeyError`` for a query
    without rows."""
    keys = [("rank", "ascending")] if order == "rank" else [("global_score", "descending"), ("image_id", "ascending")]
    ordered = rankings.sort_by([("query_id", "ascending"), *keys])
    qid = ordered.column("query_id").to_numpy(zero_copy_only=False).astype(str)
    ids = ordered.column("image_id").to_numpy(zero_copy_only=False).astype(str)
    values = ordered.column(column).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, qid[1:] != qid[:-1]]) if len(qid) else np.zeros(0, int)
    bounds = dict(zip(qid[starts], zip(starts, np.r_[starts[1:], len(qid)]))) if len(qid) else {}
    missing = [q for q in query_ids if q not in bounds]
    if missing:
        raise KeyError(f"rankings: no rows for query {missing[0]!r} ({len(missing)} queries missing)")
    depth = max((b - a for a, b in bounds.values()), default=0)
    out_ids = np.full((len(query_ids), depth), "", dtype=ids.dtype if len(ids) else "<U1")
    out_scores = np.full((len(query_ids), depth), -np.inf, dtype=np.float32)
    for row, q in enumerate(query_ids):
        a, b = bounds[q]
        out_ids[row, : b - a], out_scores[row, : b - a] = ids[a:b], values[a:b]
    return TopK(np.asarray(query_ids, dtype=str), out_ids, out_scores)


def revisitop_ranks(rankings: pa.Table, gt: dict, query_ids: Sequence[str]) -> np.ndarray:
    """``(depth, n_queries)`` indices into ``gt['imlist']`` for revisitop metrics: ids not in the
    ground truth (distractors) get indices past it (never positive or junk), padding -1."""
    ranking = rankings_to_topk(rankings, query_ids)
    where = {name: i for i, name in enumerate(gt["imlist"])}
    n = len(where)
    flat = ranking.ids.ravel()
    unknown = {name: n + i for i, name in enumerate(sorted(set(flat) - set(where) - {""}))}
    index = np.array([-1 if name == "" else where.get(name, unknown.get(name, -1)) for name in flat], dtype=np.int64)
    return index.reshape(ranking.ids.shape).T.copy()


def evaluate_rankings(rankings: pa.Table, gt: dict, query_ids: Sequence[str], ks: Sequence[int] = DEFAULT_KS,
                      protocols: Sequence[str] = PROTOCOLS) -> dict[str, dict[str, float]]:
    """revisitop mAP and mP@k (fractions) of ``rankings`` whose ``query_ids`` are the ground
    truth's queries in ``qimlist`` order; truncated lists are scored safely (positives missing
    from a list count as not retrieved). ``protocols``: the protocols to report."""
    results = evaluate(revisitop_ranks(rankings, gt, query_ids), gt, ks)
    return {p: results[p] for p in protocols}


def per_query_ap(rankings: pa.Table, gt: dict, query_ids: Sequence[str], protocol: str) -> np.ndarray:
    """(n_queries,) AP of each query under ``protocol`` (NaN for a query without positives)."""
    return evaluate_per_query(revisitop_ranks(rankings, gt, query_ids), gt)[protocol]["ap"]


def benchmark_ranking(net: torch.nn.Module, bench: Benchmark, scales: Sequence[float],
                      database: np.ndarray | None = None, ids: Sequence[str] | None = None) -> TopK:
    """The full exact global ranking of ``bench``'s database for each of its queries, all
    described here by the global network ``net`` at ``scales``; ``database`` / ``ids``: given
    database descriptors instead (e.g. read from an extraction)."""
    from cvnet.models.global_net import multiscale_descriptors

    if database is None:
        if bench.images is None:
            raise ValueError(f"{bench.root}: database images not loaded and no descriptors given")
        database, ids = multiscale_descriptors(net, bench.images, scales), bench.ids
    queries = multiscale_descriptors(net, bench.query_images, scales)
    return global_search(Descriptors(queries, bench.query_ids), Descriptors(database, list(ids)), len(ids),
                         exclude_self=False)


def benchmark_rerank_features(model: torch.nn.Module, bench: Benchmark) -> tuple[dict, dict]:
    """The re-ranking features (``CVNet.rerank_features``) of ``bench``'s queries and database
    images, by id."""
    queries = {q: model.rerank_features(image) for q, image in zip(bench.query_ids, bench.query_images)}
    return queries, {n: model.rerank_features(image) for n, image in zip(bench.ids, bench.images)}


def evaluate_global(net: torch.nn.Module, root: str, scales: Sequence[float] | None = None,
                    features: str | None = None, extractor_sha256: str | None = None) -> dict[str, dict[str, float]]:
    """revisitop metrics (fractions) of the global network ``net`` on the (small) benchmark at
    ``root``, in this process: queries cropped to their ``bbx`` and described here, database
    descriptors read from the extraction output ``features`` (refused unless extracted by the
    model of extractor hash ``extractor_sha256``) or described here; full exact global rankings. Large
    benchmarks go through ``cvnet evaluate`` (Ray) instead."""
    from cvnet import storage
    from cvnet.config import DEFAULT_SCALES
    from cvnet.features import read_descriptors

    bench = load_benchmark(root, images=features is None)
    ids = database = None
    if features is not None:
        ids, database = read_descriptors(features, extractor_sha256=extractor_sha256)
        missing = set(bench.ids) - set(ids)
        if missing:
            raise KeyError(f"{storage.redact(features)}: no descriptor for database image {sorted(missing)[0]!r} "
                           f"({len(missing)} missing)")
    ranking = benchmark_ranking(net, bench, scales or DEFAULT_SCALES, database, ids)
    return evaluate_rankings(fuse(ranking, None), bench.gt, bench.query_ids)


def evaluate_rerank(model: torch.nn.Module, root: str, k: int = DEFAULT_K, scales: Sequence[float] = (1.0,),
                    rules: Sequence[str] = SHORTLISTS) -> dict[str, dict[str, dict[str, float]]]:
    """revisitop results (fractions) of the CVNet ``model`` on the (small) benchmark at ``root``,
    in this process: ``global`` retrieval and its top-``k`` re-ranked and fused under each
    shortlist rule (``rerank_topk``: the raw top-k; ``rerank_gt_aware``: each protocol's junk
    removed first, scored with that protocol). The labels are those of ``cvnet evaluate``."""
    bench = load_benchmark(root)
    gt, queries = bench.gt, bench.query_ids
    ranking = benchmark_ranking(model.encoder_q, bench, scales)
    features = benchmark_rerank_features(model, bench)
    score = model.match_probability
    results = {"global": evaluate_rankings(retrieve(ranking, k, None), gt, queries)}
    if "topk" in rules:
        results["rerank_topk"] = evaluate_rankings(retrieve(ranking, k, score, *features), gt, queries)
    if "gt-aware" in rules:
        results["rerank_gt_aware"] = {p: evaluate_rankings(
            retrieve(ranking, k, score, *features, junk=protocol_junk(gt, p)), gt, queries, protocols=[p])[p]
            for p in PROTOCOLS}
    return results


def flat_metrics(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """``<label>_<protocol>_<metric>`` x100 (``mp@10`` -> ``mp_at_10``) from results by label
    (``global``, ``rerank_topk``, ``rerank_gt_aware``): the names logged to MLflow, tagged on
    registered versions and compared by the promotion gate."""
    return {f"{label}_{protocol}_{name.replace('@', '_at_')}": 100 * value
            for label, res in results.items() for protocol, scores in res.items() for name, value in scores.items()}

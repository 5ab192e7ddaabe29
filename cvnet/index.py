"""faiss inner-product search (cosine for L2-normalised descriptors): exact flat, and IVF / IVF-PQ
(approximate candidates, exact scores) for the sharded global search of the re-ranking job."""
from __future__ import annotations

from typing import TYPE_CHECKING

import faiss
import numpy as np

if TYPE_CHECKING:
    from cvnet.search import Descriptors, TopK


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, dim) array, got shape {x.shape}")
    return x


def topk(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product: ``(scores, indices)``, each (n_queries, k'), best first.

    ``k' = min(k, n_database)``; the search runs on faiss' ``IndexFlatIP``.
    """
    queries, database = _as_matrix(queries, "queries"), _as_matrix(database, "database")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but database has dim "
                         f"{database.shape[1]}")
    if k < 1:
        raise ValueError(f"k: {k} must be at least 1")
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    scores, indices = index.search(queries, min(k, database.shape[0]))
    return scores, indices.astype(np.int64)


def ranks_for_revisitop(queries: np.ndarray, database: np.ndarray, k: int | None = None
                        ) -> np.ndarray:
    """Rankings in the revisitop layout: (n_ranked, n_queries) database indices, best first."""
    _, indices = topk(queries, database, k or database.shape[0])
    return indices.T.copy()


def ivf_search(queries: Descriptors, gallery: Descriptors, k: int, kind: str = "ivf", nlist: int = 1024,
               nprobe: int = 16, pq_m: int = 64, exclude_self: bool = False) -> TopK:
    """Approximate top-``k`` by faiss IVF-Flat (``kind="ivf"``) or IVF-PQ (``"ivfpq"``) trained on
    ``gallery``: the index chooses the candidates, which are then scored exactly (float64 inner
    product rounded to float32) and ordered as :func:`cvnet.search.search` orders (score, then id).
    ``nlist`` is capped at ``len(gallery) // 39`` (faiss' minimum training points per list); PQ
    codes use up to 8 bits (fewer on small galleries). Measure it with :func:`cvnet.search.recall_at_k`."""
    from cvnet.search import TopK, _as_ids

    q, g = _as_matrix(np.asarray(queries.vectors), "queries"), _as_matrix(np.asarray(gallery.vectors), "gallery")
    qids, gids = _as_ids(queries.ids), _as_ids(gallery.ids)
    n, d = g.shape
    lists = max(1, min(nlist, n // 39))
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivfpq":
        if d % pq_m:
            raise ValueError(f"pq_m: {pq_m} does not divide the descriptor dim {d}")
        bits = int(max(1, min(8, np.floor(np.log2(max(2, n // 39))))))
        index = faiss.IndexIVFPQ(quantizer, d, lists, pq_m, bits, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"index kind must be 'ivf' or 'ivfpq', got {kind!r}")
    index.train(g)
    index.add(g)
    index.nprobe = min(nprobe, lists)
    wanted = min(n, k + int(exclude_self))
    _, found = index.search(q, wanted)
    ids = np.full((len(q), k), "", dtype=gids.dtype)
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    for row in range(len(q)):
        cand = found[row][found[row] >= 0]
        if exclude_self:
            cand = cand[gids[cand] != qids[row]]
        exact = (g[cand].astype(np.float64) @ q[row].astype(np.float64)).astype(np.float32)
        order = np.lexsort((gids[cand], -exact))[:k]
        ids[row, :len(order)], scores[row, :len(order)] = gids[cand][order], exact[order]
    return TopK(qids, ids, scores, pairs=len(q) * n)

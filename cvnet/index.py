"""Exact inner-product search with faiss (cosine for L2-normalised descriptors)."""
from __future__ import annotations

import faiss
import numpy as np


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

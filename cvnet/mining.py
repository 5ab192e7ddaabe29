"""Hard negatives: the committed table of DESIGN.md and the plan of an incremental re-mine. Pure.

The table ``hard_negatives.lance`` (key ``image_id``) holds, for every image of a features table,
its ``keep`` most similar images of *other* landmarks (and not itself), best first, as found by
:func:`cvnet.search.search`: ``image_id``, ``landmark_id``, ``negative_ids``, ``negative_scores``,
and ``mined_from_version``, the features table version whose gallery the row was mined against.

Incremental re-mining (:func:`plan_update`). For the rows mined at an older version ``v``, an
image is *unchanged* when it was in the features at ``v`` under the same URI (so the same
descriptor) and its own row, mined at ``v``, records the landmark it has now. A row of version
``v`` whose image and listed negatives are all unchanged is updated by searching it against the
*delta* only (every current image that is not unchanged) and merging with its stored list:
the top ``keep`` of the union equals a full search, because the stored list is the top ``keep``
over the unchanged images and the float32 scores are deterministic (``cvnet.search``). Every
other row (new, landmark or URI changed, a negative that changed or left, a row lost to a crash)
is searched in full. Rows of images that left the features are removed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvnet.search import TopK

TABLE = "hard_negatives.lance"
SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("landmark_id", pa.int64()),
    pa.field("negative_ids", pa.list_(pa.string()), nullable=False),
    pa.field("negative_scores", pa.list_(pa.float32()), nullable=False),
    pa.field("mined_from_version", pa.int64(), nullable=False),
])


def mining_settings(features_settings: Mapping[str, Any], keep: int, precision: str,
                    landmarks_from: str) -> dict[str, Any]:
    """What determines a mining table's numbers: the model, ``keep``, the tile precision and
    where the landmarks come from (``features`` or a manifest URI)."""
    return {"extractor_sha256": features_settings.get("extractor_sha256"), "keep": keep, "precision": precision,
            "landmarks_from": landmarks_from}


def negatives_table(result: TopK, landmarks: Sequence[int | None], version: int) -> pa.Table:
    """Table rows from a search result (padding dropped), mined against features ``version``."""
    found = result.ids != ""
    lengths = found.sum(axis=1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(result.ids[found].tolist(), pa.string()))
    scores = pa.ListArray.from_arrays(offsets, pa.array(result.scores[found], pa.float32()))
    landmarks = pa.array([None if lm is None or lm < 0 else int(lm) for lm in landmarks], pa.int64())
    return pa.Table.from_arrays([pa.array(result.query_ids.tolist(), pa.string()), landmarks, ids, scores,
                                 pa.array(np.full(len(lengths), version), pa.int64())], schema=SCHEMA)


def stored_topk(query_ids: Sequence[str], negative_ids: Sequence[Sequence[str]],
                negative_scores: Sequence[Sequence[float]], keep: int) -> TopK:
    """Stored lists as a :class:`TopK` of width ``keep`` (padded with ``''`` / ``-inf``)."""
    ids = np.full((len(query_ids), keep), "", dtype=object)
    scores = np.full((len(query_ids), keep), -np.inf, dtype=np.float32)
    for row, (listed, values) in enumerate(zip(negative_ids, negative_scores)):
        ids[row, : len(listed)], scores[row, : len(values)] = listed, values
    return TopK(np.asarray(query_ids, dtype=str), ids.astype(str), scores)


@dataclass
class Plan:
    """The work of one (re-)mine against the features at ``version`` (rows index the gallery).

    ``full``: rows searched against the whole gallery; ``incremental[v]``: ``(rows, delta)``,
    rows of version ``v`` searched against the gallery rows ``delta`` and merged with their
    stored lists; ``remove``: stored image ids no longer in the features; ``done``: rows mined at
    ``version`` already (a resumed run)."""

    version: int
    gallery_size: int
    full: np.ndarray
    incremental: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    done: int = 0

    @property
    def pairs(self) -> int:
        """Inner products this plan computes."""
        return len(self.full) * self.gallery_size + sum(len(r) * len(d) for r, d in self.incremental.values())

    @property
    def rows(self) -> int:
        return len(self.full) + sum(len(r) for r, _ in self.incremental.values())


def plan_update(current: pa.Table, version: int, mined: pa.Table,
                previous: Mapping[int, pa.Table | None]) -> Plan:
    """The plan for ``current`` (``image_id``, ``uri``, ``landmark_id`` of the features at
    ``version``, in gallery row order) given the stored rows ``mined`` (``image_id``,
    ``landmark_id``, ``negative_ids``, ``mined_from_version``) and ``previous[v]``, the
    ``image_id``, ``uri`` of the features at each stored version ``v`` (``None``: no longer
    readable, so its rows are redone in full). See the module docstring for the rules.

    Arrow kernels and numpy arrays of row indices throughout (no Python object per row or per
    listed negative), so memory stays near the size of the tables."""
    ids = _array(current, "image_id")
    n = len(ids)
    stored_ids = _array(mined, "image_id")
    at = _array(mined, "mined_from_version").to_numpy()
    row = _rows_in(stored_ids, ids)  # gallery row of each stored row; n: it left the features
    negatives = mined.column("negative_ids")
    listed_row = _rows_in(pc.list_flatten(negatives), ids)  # gallery row of each listed negative
    listed_by = np.repeat(np.arange(len(at), dtype=np.int32), pc.list_value_length(negatives).to_numpy())
    full = [np.flatnonzero(~pc.is_in(ids, value_set=stored_ids).to_numpy(zero_copy_only=False))]  # never mined
    incremental = {}
    for then in np.unique(at[(row < n) & (at != version)]).tolist():
        positions = np.flatnonzero((row < n) & (at == then))
        if previous.get(then) is None:
            full.append(row[positions])
            continue
        unchanged = _unchanged(current, previous[then], row[positions],
                               _array(mined, "landmark_id").take(positions))
        listed_changed = np.bincount(listed_by[~unchanged[listed_row]], minlength=len(at))[positions]
        ok = unchanged[row[positions]] & (listed_changed == 0)
        full.append(row[positions[~ok]])
        if ok.any():
            incremental[then] = (np.sort(row[positions[ok]]), np.flatnonzero(~unchanged[:n]))
    return Plan(version, n, np.unique(np.concatenate(full)).astype(np.int64), incremental,
                stored_ids.filter(pa.array(row == n)).to_pylist(), int((at == version).sum()))


def _array(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _rows_in(values: pa.Array | pa.ChunkedArray, ids: pa.Array) -> np.ndarray:
    """The row of each of ``values`` in ``ids`` (int64); ``len(ids)`` where it is absent."""
    return pc.index_in(values, value_set=ids).fill_null(len(ids)).to_numpy().astype(np.int64, copy=False)


def _unchanged(current: pa.Table, then: pa.Table, rows: np.ndarray, landmarks_then: pa.Array) -> np.ndarray:
    """``(N + 1,)`` bool over the gallery rows (the last, for absent images, False): the image
    has a row ``rows`` of the stored version (with ``landmarks_then``), was in the features
    ``then`` under its current URI, and that row records its current landmark."""
    n = current.num_rows
    stored_at = np.full(n, -1, dtype=np.int64)
    stored_at[rows] = np.arange(len(rows))
    landmark_then = landmarks_then.take(pa.array(stored_at, mask=stored_at < 0))
    uri_then = _array(then, "uri").take(pc.index_in(_array(current, "image_id"), value_set=_array(then, "image_id")))
    out = np.zeros(n + 1, dtype=bool)
    out[:n] = (stored_at >= 0) & _same(uri_then, _array(current, "uri")) & _same(landmark_then,
                                                                                _array(current, "landmark_id"))
    return out


def _same(a: pa.Array, b: pa.Array) -> np.ndarray:
    """Element-wise ``a == b`` with null equal to null (as ``None == None``)."""
    equal = pc.fill_null(pc.equal(a, b), False)
    return pc.or_(equal, pc.and_(a.is_null(), b.is_null())).to_numpy(zero_copy_only=False)

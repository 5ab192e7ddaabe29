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
    return {"model_sha256": features_settings.get("model_sha256"), "keep": keep, "precision": precision,
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
                previous: Mapping[int, Mapping[str, str] | None]) -> Plan:
    """The plan for ``current`` (``image_id``, ``uri``, ``landmark_id`` of the features at
    ``version``, in gallery row order) given the stored rows ``mined`` (``image_id``,
    ``landmark_id``, ``negative_ids``, ``mined_from_version``) and ``previous[v]``, the
    ``{image_id: uri}`` of the features at each stored version ``v`` (``None``: no longer readable,
    so its rows are redone in full). See the module docstring for the rules."""
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
    full = set(ids) - set(stored["image_id"])  # never mined (new, or lost to a crash)
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
    return Plan(version, len(ids), np.array(sorted(row_of[i] for i in full), dtype=np.int64), incremental,
                remove, len(done))

"""Extracted features as committed tables (:mod:`cvnet.tables`) and reading them back.

An extraction output folder holds two Lance tables keyed by ``image_id``:

- ``features.lance``: ``image_id``, ``uri``, ``landmark_id``, ``descriptor``
  fixed_size_list<float32|float16>[2048], and with rerank features the three pyramid levels
  ``level_{i}`` (raw little-endian float32|float16 bytes of a (256, h_i, w_i) array) with their
  shapes ``shape_{i}``;
- ``bad_inputs.lance``: ``image_id``, ``uri``, ``stage``, ``error``.

Both carry the extraction settings (model SHA-256, scales, float16, rerank features,
preprocessing), so every reader can check that features belong to the model it uses. One
output per model grows with every manifest given to it; an image is in exactly one table.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cvnet import storage
from cvnet.tables import Table, TableError

DESCRIPTOR_DIM = 2048
N_LEVELS = 3
PREPROCESSING = "bgr-uint8, cv2.resize area<1/linear>1, /255, bgr mean/std; queries cropped to bbx"
FEATURES = "features.lance"
BAD_INPUTS = "bad_inputs.lance"

BAD_INPUTS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),
])


class ModelMismatch(TableError):
    """Features were extracted with another model than the one being used (another
    :func:`cvnet.models.checkpoints.extractor_sha256`)."""


def extraction_settings(extractor_sha256: str, scales: Sequence[float], float16: bool,
                        rerank_features: bool) -> dict[str, Any]:
    """The settings that determine the stored numbers (a table refuses other values)."""
    return {"extractor_sha256": extractor_sha256, "scales": [float(s) for s in scales], "float16": float16,
            "rerank_features": rerank_features, "preprocessing": PREPROCESSING}


def features_schema(float16: bool = False, rerank_features: bool = False) -> pa.Schema:
    """Columns of the features table."""
    value = pa.float16() if float16 else pa.float32()
    fields = [pa.field("image_id", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False),
              pa.field("landmark_id", pa.int64()),
              pa.field("descriptor", pa.list_(value, DESCRIPTOR_DIM), nullable=False)]
    if rerank_features:
        for i in range(N_LEVELS):
            fields += [pa.field(f"level_{i}", pa.large_binary(), nullable=False),
                       pa.field(f"shape_{i}", pa.list_(pa.int32(), 3), nullable=False)]
    return pa.schema(fields)


def features_table(rows: Sequence[Mapping[str, Any]], X: np.ndarray, float16: bool,
                   levels: Sequence[Sequence[np.ndarray]] | None = None) -> pa.Table:
    """Feature rows: ``rows`` give ``image_id``, ``uri``, ``landmark_id``; ``X`` (N, 2048) the
    descriptors; ``levels[row][i]`` the (256, h_i, w_i) pyramid levels when stored."""
    if X.shape != (len(rows), DESCRIPTOR_DIM):
        raise ValueError(f"descriptors have shape {X.shape}, expected ({len(rows)}, {DESCRIPTOR_DIM})")
    dtype = np.dtype("<f2") if float16 else np.dtype("<f4")
    columns: dict[str, pa.Array] = {
        "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
        "uri": pa.array([r["uri"] for r in rows], pa.string()),
        "landmark_id": pa.array([r["landmark_id"] for r in rows], pa.int64()),
        "descriptor": pa.FixedSizeListArray.from_arrays(pa.array(X.astype(dtype).ravel()), DESCRIPTOR_DIM)}
    for i in range(N_LEVELS if levels is not None else 0):
        columns[f"level_{i}"] = pa.array([np.ascontiguousarray(lv[i], dtype=dtype).tobytes() for lv in levels],
                                         pa.large_binary())
        columns[f"shape_{i}"] = pa.array([list(lv[i].shape) for lv in levels], pa.list_(pa.int32(), 3))
    schema = features_schema(float16, levels is not None)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def bad_inputs_table(rows: Sequence[Mapping[str, str]]) -> pa.Table:
    """The bad-inputs rows from dicts with ``image_id``, ``uri``, ``stage``, ``error``."""
    return pa.Table.from_pylist(list(rows), schema=BAD_INPUTS_SCHEMA)


def open_features(uri: str, version: int | None = None, extractor_sha256: str | None = None) -> Table:
    """The features table of the extraction output ``uri``; with ``extractor_sha256``, refuse
    features of another model (:class:`ModelMismatch`)."""
    table = Table.open(storage.join(uri, FEATURES), version)
    if extractor_sha256 is not None and table.settings.get("extractor_sha256") != extractor_sha256:
        raise ModelMismatch(f"{storage.redact(uri)}: features of model {table.settings.get('extractor_sha256')}, "
                            f"not of the model in use ({extractor_sha256}); extract with this model first")
    return table


def descriptors_of(table: pa.Table) -> np.ndarray:
    """The (N, 2048) float32 descriptors of feature rows."""
    column = table.column("descriptor").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, DESCRIPTOR_DIM)


def read_descriptors(uri: str, version: int | None = None,
                     extractor_sha256: str | None = None) -> tuple[list[str], np.ndarray]:
    """``(image_ids, X)`` of the committed descriptors of ``uri``; X is (N, 2048) float32."""
    rows = open_features(uri, version, extractor_sha256).read(["image_id", "descriptor"])
    return rows.column("image_id").to_pylist(), descriptors_of(rows)


def levels_of(row: Mapping[str, Any], float16: bool) -> tuple[np.ndarray, ...]:
    """The float32 pyramid levels of one feature row."""
    dtype = np.dtype("<f2") if float16 else np.dtype("<f4")
    return tuple(np.frombuffer(row[f"level_{i}"], dtype=dtype).astype(np.float32).reshape(row[f"shape_{i}"])
                 for i in range(N_LEVELS))


def read_rerank_levels(uri: str, image_ids: Sequence[str] | None = None, version: int | None = None,
                       extractor_sha256: str | None = None) -> dict[str, tuple[np.ndarray, ...]]:
    """Committed rerank pyramid levels by image id (float32 arrays): all, or ``image_ids`` read by
    key (only those rows are read; ``KeyError`` names missing ones)."""
    table = open_features(uri, version, extractor_sha256)
    if not table.settings.get("rerank_features"):
        raise TableError(f"{storage.redact(uri)}: extracted without rerank features")
    columns = ["image_id"] + [f"{p}_{i}" for i in range(N_LEVELS) for p in ("level", "shape")]
    rows = table.read(columns) if image_ids is None else table.take(image_ids, columns)
    float16 = table.settings["float16"]
    return {row["image_id"]: levels_of(row, float16) for row in rows.to_pylist()}


def read_bad_inputs(uri: str, version: int | None = None) -> pa.Table:
    """The committed bad-input rows of ``uri``."""
    return Table.open(storage.join(uri, BAD_INPUTS), version).read()

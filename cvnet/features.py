"""Parquet formats of extracted features (DESIGN "Data contracts") and reading them back.

An extraction output folder holds committed shards (see :mod:`cvnet.storage`) of three tables:

- ``descriptors``: ``image_id``, ``landmark_id``, ``descriptor`` fixed_size_list<float32|float16>[2048];
- ``rerank``: ``image_id`` and the three pyramid levels ``level_{i}`` (raw little-endian
  float32|float16 bytes of a (256, h_i, w_i) array) with their shapes ``shape_{i}``;
- ``bad_inputs``: ``image_id``, ``uri``, ``stage``, ``error``.

The file metadata carries the schema name and version, the model URI and hash, the scales and
the preprocessing. Readers read only committed files.
"""
from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cvnet.storage import committed_files, filesystem

DESCRIPTOR_DIM = 2048
N_LEVELS = 3
SCHEMA_KEY = b"cvnet.schema"
PREPROCESSING = "bgr-uint8, cv2.resize area<1/linear>1, /255, bgr mean/std"

BAD_INPUTS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),
], metadata={SCHEMA_KEY: b"bad_inputs/1"})


def _value_type(float16: bool) -> pa.DataType:
    return pa.float16() if float16 else pa.float32()


def _metadata(name: str, info: Mapping[str, Any]) -> dict[bytes, bytes]:
    meta = {SCHEMA_KEY: name.encode(), b"cvnet.preprocessing": PREPROCESSING.encode()}
    meta.update({f"cvnet.{k}".encode(): json.dumps(v).encode() for k, v in sorted(info.items())})
    return meta


def descriptor_schema(float16: bool = False, info: Mapping[str, Any] | None = None) -> pa.Schema:
    """The descriptors schema; ``info`` (model_uri, model_sha256, scales, ...) goes to metadata."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("landmark_id", pa.int64()),
        pa.field("descriptor", pa.list_(_value_type(float16), DESCRIPTOR_DIM), nullable=False),
    ], metadata=_metadata("descriptors/1", dict(info or {}, float16=float16)))


def rerank_schema(float16: bool = False, info: Mapping[str, Any] | None = None) -> pa.Schema:
    """The rerank-features schema: three levels as raw bytes plus their (c, h, w) shapes."""
    fields = [pa.field("image_id", pa.string(), nullable=False)]
    for i in range(N_LEVELS):
        fields += [pa.field(f"level_{i}", pa.large_binary(), nullable=False),
                   pa.field(f"shape_{i}", pa.list_(pa.int32(), 3), nullable=False)]
    return pa.schema(fields, metadata=_metadata("rerank_features/1", dict(info or {}, float16=float16)))


def _is_float16(schema: pa.Schema) -> bool:
    return json.loads((schema.metadata or {}).get(b"cvnet.float16", b"false"))


def descriptor_table(ids: Sequence[str], landmark_ids: Sequence[int | None], X: np.ndarray,
                     schema: pa.Schema) -> pa.Table:
    """Rows of descriptors ``X`` (N, 2048) in ``schema``'s storage type."""
    if X.shape != (len(ids), DESCRIPTOR_DIM):
        raise ValueError(f"descriptors have shape {X.shape}, expected ({len(ids)}, {DESCRIPTOR_DIM})")
    values = pa.array(X.astype(np.float16 if _is_float16(schema) else np.float32).ravel())
    column = pa.FixedSizeListArray.from_arrays(values, DESCRIPTOR_DIM)
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(landmark_ids, pa.int64()), column],
                                schema=schema)


def rerank_table(ids: Sequence[str], levels: Sequence[Sequence[np.ndarray]], schema: pa.Schema) -> pa.Table:
    """Rows of per-image pyramid levels (``levels[row][i]`` a (256, h_i, w_i) float array)."""
    dtype = np.dtype("<f2") if _is_float16(schema) else np.dtype("<f4")
    columns: list[pa.Array] = [pa.array(ids, pa.string())]
    for i in range(N_LEVELS):
        columns.append(pa.array([np.ascontiguousarray(row[i], dtype=dtype).tobytes() for row in levels],
                                pa.large_binary()))
        columns.append(pa.array([list(row[i].shape) for row in levels], pa.list_(pa.int32(), 3)))
    return pa.Table.from_arrays(columns, schema=schema)


def bad_inputs_table(rows: Sequence[Mapping[str, str]]) -> pa.Table:
    """The bad-inputs table from dicts with ``image_id``, ``uri``, ``stage``, ``error``."""
    return pa.Table.from_pylist(list(rows), schema=BAD_INPUTS_SCHEMA)


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write one Parquet file (visibility is governed by the shard commit, not by this write)."""
    fs, path = filesystem(uri)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, sink.getvalue())


def _read_files(files: Sequence[str]) -> list[pa.Table]:
    tables = []
    for file_uri in files:
        fs, path = filesystem(file_uri)
        tables.append(pq.read_table(path, filesystem=fs))
    return tables


def read_committed(uri: str, name: str) -> pa.Table:
    """All committed rows of table ``name`` (``descriptors``, ``rerank``, ``bad_inputs``) under ``uri``."""
    tables = _read_files(committed_files(uri, name))
    if not tables:
        raise FileNotFoundError(f"{uri}: no committed {name} files")
    return pa.concat_tables(tables)


def read_descriptors(uri: str) -> tuple[list[str], np.ndarray]:
    """``(image_ids, X)`` of the committed descriptors under ``uri``; X is (N, 2048) float32."""
    table = read_committed(uri, "descriptors")
    column = table.column("descriptor").combine_chunks()
    X = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, DESCRIPTOR_DIM)
    return table.column("image_id").to_pylist(), X


def read_rerank_levels(uri: str, image_ids: Sequence[str] | None = None) -> dict[str, tuple[np.ndarray, ...]]:
    """Committed rerank pyramid levels by image id (float32 arrays), optionally only ``image_ids``."""
    table = read_committed(uri, "rerank")
    dtype = np.dtype("<f2") if _is_float16(table.schema) else np.dtype("<f4")
    wanted = set(image_ids) if image_ids is not None else None
    out: dict[str, tuple[np.ndarray, ...]] = {}
    for row in table.to_pylist():
        if wanted is not None and row["image_id"] not in wanted:
            continue
        out[row["image_id"]] = tuple(
            np.frombuffer(row[f"level_{i}"], dtype=dtype).astype(np.float32).reshape(row[f"shape_{i}"])
            for i in range(N_LEVELS))
    if wanted is not None and len(out) != len(wanted):
        missing = sorted(wanted - set(out))[:5]
        raise KeyError(f"{uri}: no rerank features for {missing}")
    return out


def read_bad_inputs(uri: str) -> pa.Table:
    """The committed bad-inputs rows under ``uri`` (empty table when there were none)."""
    tables = _read_files(committed_files(uri, "bad_inputs"))
    return pa.concat_tables(tables) if tables else BAD_INPUTS_SCHEMA.empty_table()

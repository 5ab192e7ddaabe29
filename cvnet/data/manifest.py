"""The image manifest (DESIGN "Data contracts") and reading image bytes by URI.

An image URI is either a plain fsspec URI (``/data/x.jpg``, ``s3://bucket/x.jpg``) or a member
of an uncompressed tar shard, written as the fsspec chained URL

    tar://<member>::<tar uri>        e.g. ``tar://0/1/2/012abc.jpg::s3://bucket/train/images_000.tar``

Tar members are read with one ranged read each: the shard's member index (name -> data offset
and size) is built once per process from the tar headers (:func:`tar_index`) and cached (the
``TAR_CACHE_SHARDS`` most recently used shards), so reading N members of one shard never
rescans it and never extracts the whole tar.
"""
from __future__ import annotations

import tarfile
import threading
from collections import OrderedDict
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cvnet.storage import filesystem, put_atomic, redact

MANIFEST_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("landmark_id", pa.int64(), nullable=True),
    pa.field("split", pa.string(), nullable=False),
], metadata={b"cvnet.schema": b"image_manifest/1"})

TAR_PREFIX = "tar://"


class ManifestError(ValueError):
    """A manifest file is missing columns, has wrong types or null required values."""

    def __init__(self, uri: str, reason: str):
        super().__init__(redact(f"manifest {uri}: {reason}"))
        self.uri = uri
        self.reason = reason


class ImageReadError(OSError):
    """Image bytes could not be read (missing file, missing or unreadable tar member).

    ``transient`` marks failures a retry may cure (any I/O error other than a file the
    filesystem confirms is absent); the others are permanent.
    """

    def __init__(self, uri: str, reason: str, transient: bool = False):
        super().__init__(redact(f"{uri}: {reason}"))
        self.uri = uri
        self.reason = reason
        self.transient = transient


def tar_member_uri(tar_uri: str, member: str) -> str:
    """The chained URI of ``member`` inside the tar shard ``tar_uri``."""
    return f"{TAR_PREFIX}{member}::{tar_uri}"


def split_tar_uri(uri: str) -> tuple[str, str] | None:
    """``(tar_uri, member)`` for a tar-member URI, else ``None``."""
    if not uri.startswith(TAR_PREFIX) or "::" not in uri:
        return None
    member, tar_uri = uri[len(TAR_PREFIX):].split("::", 1)
    return tar_uri, member


def validate_manifest(table: pa.Table, uri: str = "<table>") -> pa.Table:
    """Check columns, types and required values; return the table cast to MANIFEST_SCHEMA."""
    missing = [f.name for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ManifestError(uri, f"missing column(s) {missing}; has {table.column_names}")
    columns = []
    for field in MANIFEST_SCHEMA:
        column = table.column(field.name)
        try:
            column = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ManifestError(uri, f"column {field.name!r} is {column.type}, not {field.type}: {exc}") from exc
        if not field.nullable and column.null_count:
            raise ManifestError(uri, f"column {field.name!r} has {column.null_count} null value(s)")
        if field.type == pa.string():
            empty = pc.sum(pc.equal(column, "")).as_py() or 0
            if empty:
                raise ManifestError(uri, f"column {field.name!r} has {empty} empty value(s)")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)


def read_manifest(uri: str) -> pa.Table:
    """Read a manifest from Parquet (a file or a folder of files) or CSV, validated."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise ManifestError(uri, "no such file or folder")
    try:
        if path.endswith(".csv"):
            with fs.open(path, "rb") as f:
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={f.name: f.type for f in MANIFEST_SCHEMA},
                    strings_can_be_null=True))
        else:
            table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(uri, f"unreadable: {exc}") from exc
    return validate_manifest(table, uri)


def write_manifest(table: pa.Table, uri: str) -> None:
    """Write a validated manifest as one Parquet file, atomically (:func:`storage.put_atomic`)."""
    table = validate_manifest(table, uri)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    put_atomic(uri, sink.getvalue().to_pybytes())


# ---- tar shards -----------------------------------------------------------------------------

TarIndex = dict[str, tuple[int, int]]  # member name -> (data offset, size)
# Most recently used shard indexes kept per process (a GLDv2 train shard has ~8k members,
# about 1-2 MB of index; readers usually walk a manifest shard by shard).
TAR_CACHE_SHARDS = 64
_TAR_INDEXES: OrderedDict[str, TarIndex] = OrderedDict()
_TAR_LOCK = threading.Lock()


def scan_tar(fileobj: BinaryIO, uri: str, size: int, stream: bool = False) -> TarIndex:
    """The member index of an uncompressed tar of ``size`` bytes, refusing a truncated one.

    ``stream=False`` seeks over member data (reads headers only); ``stream=True`` reads the
    file front to back, for callers that hash every byte. A complete tar ends with two zero
    blocks after its last member, so a shard cut short anywhere is detected.
    """
    index: TarIndex = {}
    end = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|" if stream else "r:") as tar:
            for info in tar:
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if info.isfile():
                    index[info.name] = (info.offset_data, info.size)
    except tarfile.TarError as exc:
        raise ImageReadError(uri, f"not a readable uncompressed tar: {exc}") from exc
    if size < end + 2 * tarfile.BLOCKSIZE:
        raise ImageReadError(uri, f"truncated tar shard: {size} bytes, its members and end "
                                  f"marker need {end + 2 * tarfile.BLOCKSIZE}")
    return index


def cache_tar_index(tar_uri: str, index: TarIndex) -> None:
    """Remember a shard's member index for this process (the least recently used goes)."""
    with _TAR_LOCK:
        _TAR_INDEXES[tar_uri] = index
        _TAR_INDEXES.move_to_end(tar_uri)
        while len(_TAR_INDEXES) > TAR_CACHE_SHARDS:
            _TAR_INDEXES.popitem(last=False)


def tar_index(tar_uri: str) -> TarIndex:
    """The member index of a tar shard, from the per-process cache or by scanning its headers."""
    with _TAR_LOCK:
        cached = _TAR_INDEXES.get(tar_uri)
        if cached is not None:
            _TAR_INDEXES.move_to_end(tar_uri)
            return cached
    fs, path = filesystem(tar_uri)
    try:
        with fs.open(path, "rb") as f:
            index = scan_tar(f, tar_uri, fs.size(path))
    except FileNotFoundError as exc:
        if _confirmed_absent(fs, path):
            raise ImageReadError(tar_uri, "tar shard not found") from exc
        raise ImageReadError(tar_uri, f"tar shard read failed: {exc}", transient=True) from exc
    except ImageReadError:
        raise
    except OSError as exc:
        raise ImageReadError(tar_uri, f"tar shard read failed: {exc}", transient=True) from exc
    cache_tar_index(tar_uri, index)
    return index


def clear_tar_cache() -> None:
    """Forget all cached shard indexes (after shards were rewritten)."""
    with _TAR_LOCK:
        _TAR_INDEXES.clear()


def read_image_bytes(uri: str) -> bytes:
    """The bytes of an image: a plain fsspec URI or a ``tar://<member>::<tar uri>`` member."""
    parts = split_tar_uri(uri)
    if parts is None:
        return _read_range(uri, uri)
    tar_uri, member = parts
    entry = tar_index(tar_uri).get(member)
    if entry is None:
        raise ImageReadError(uri, f"no member {member!r} in tar shard")
    offset, size = entry
    data = _read_range(uri, tar_uri, offset, offset + size)
    if len(data) != size:
        raise ImageReadError(uri, f"tar member truncated: {len(data)} of {size} bytes")
    return data


def _read_range(uri: str, file_uri: str, start: int | None = None, end: int | None = None) -> bytes:
    fs, path = filesystem(file_uri)
    try:
        return fs.cat_file(path, start=start, end=end)
    except FileNotFoundError as exc:
        if _confirmed_absent(fs, path):
            raise ImageReadError(uri, "file not found") from exc
        raise ImageReadError(uri, f"read failed: {exc}", transient=True) from exc
    except IsADirectoryError as exc:
        raise ImageReadError(uri, "is a directory") from exc
    except OSError as exc:
        raise ImageReadError(uri, f"read failed: {exc}", transient=True) from exc


def _confirmed_absent(fs, path: str) -> bool:
    """True when a fresh lookup confirms ``path`` does not exist (a failing lookup confirms nothing)."""
    try:
        fs.invalidate_cache(path)
        return not fs.exists(path)
    except OSError:
        return False

"""The image manifest (DESIGN "Data contracts") and reading image bytes by URI.

An image URI is either a plain fsspec URI (``/data/x.jpg``, ``s3://bucket/x.jpg``) or a member
of an uncompressed tar shard, written as the fsspec chained URL

    tar://<member>::<tar uri>        e.g. ``tar://0/1/2/012abc.jpg::s3://bucket/train/images_000.tar``

Tar members are read with one ranged read each: the shard's member index (name -> data offset
and size) is built once per process from the tar headers (:func:`tar_index`) and cached (the
``TAR_CACHE_SHARDS`` most recently used shards), so reading N members of one shard never
rescans it and never extracts the whole tar.

URIs in a manifest are absolute: :func:`write_manifest` resolves relative local paths against
the working directory of the writer (where they point for it), and :func:`read_manifest`
resolves any relative path it still finds against the manifest's own folder (a job on a cluster
has no other anchor; a relative path there once read as "file not found" for every image).
"""
from __future__ import annotations

import logging
import os
import posixpath
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cvnet.storage import filesystem, is_remote, join, put_atomic, redact

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("landmark_id", pa.int64(), nullable=True),
    pa.field("split", pa.string(), nullable=False),
    # revisitop queries: the crop box [x1, y1, x2, y2] as the ground truth gives it (pixels,
    # cut by int() truncation: cvnet.data.images.crop_query); null for whole images
    pa.field("bbx", pa.list_(pa.float64()), nullable=True),
], metadata={b"cvnet.schema": b"image_manifest/1"})
# columns a manifest may lack (written before they existed): read as all-null
OPTIONAL_COLUMNS = ("bbx",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

TAR_PREFIX = "tar://"
_ABSOLUTE = r"^(/|[A-Za-z][A-Za-z0-9+.-]*://)"  # a local absolute path or a URI with a scheme


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
    missing = [f.name for f in MANIFEST_SCHEMA
               if f.name not in table.column_names and f.name not in OPTIONAL_COLUMNS]
    if missing:
        raise ManifestError(uri, f"missing column(s) {missing}; has {table.column_names}")
    columns = []
    for field in MANIFEST_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
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
        if field.name == "bbx":
            lengths = pc.list_value_length(column)
            bad = pc.sum(pc.not_equal(lengths, 4)).as_py() or 0
            if bad:
                raise ManifestError(uri, f"column 'bbx' has {bad} box(es) without 4 values")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)


def manifest_table(image_ids: Sequence[str], uris: Sequence[str], split: str | Sequence[str],
                   landmark_ids: Sequence[int | None] | None = None,
                   bbx: Sequence[Sequence[float] | None] | None = None) -> pa.Table:
    """A manifest from its columns: ``split`` one name for every row or one per row; without
    ``landmark_ids`` / ``bbx`` those columns are null."""
    n = len(image_ids)
    field = MANIFEST_SCHEMA.field
    return pa.table({
        "image_id": pa.array(image_ids, pa.string()), "uri": pa.array(uris, pa.string()),
        "landmark_id": pa.nulls(n, pa.int64()) if landmark_ids is None else pa.array(landmark_ids, pa.int64()),
        "split": pa.array([split] * n if isinstance(split, str) else split, pa.string()),
        "bbx": pa.nulls(n, field("bbx").type) if bbx is None else pa.array(bbx, field("bbx").type),
    }, schema=MANIFEST_SCHEMA)


def scheme_uri(like: str, path: str) -> str:
    """A path from an fsspec listing (no scheme) as a URI with the scheme of ``like``."""
    return f"{like.split('://', 1)[0]}://{path}" if "://" in like else path


def list_files(folder: str) -> list[str]:
    """The URIs of every file under ``folder`` (recursive, sorted); none if it does not exist."""
    fs, path = filesystem(folder)
    if not fs.exists(path):
        return []
    return sorted(scheme_uri(folder, p) for p in fs.find(path))


def is_image_file(uri: str) -> bool:
    """Whether a file name has one of the image suffixes (:data:`IMAGE_SUFFIXES`)."""
    return uri.lower().endswith(IMAGE_SUFFIXES)


def folder_manifest(root: str, split: str = "folder") -> tuple[pa.Table, list[str]]:
    """The manifest of every image file under ``root`` (recursive), and the other files.

    ``image_id`` is the path relative to ``root`` without its suffix (``a/b/c.jpg`` -> ``a/b/c``);
    two files with one id (``c.jpg``, ``c.png``) are an error naming both.
    """
    files = list_files(root)
    images = [u for u in files if is_image_file(u)]
    prefix = len(scheme_uri(root, filesystem(root)[1]).rstrip("/")) + 1
    ids = [posixpath.splitext(u[prefix:])[0] for u in images]
    first: dict[str, str] = {}
    for image_id, uri in zip(ids, images):
        if image_id in first:
            raise ManifestError(root, f"image id {image_id!r} from both {first[image_id]} and {uri}")
        first[image_id] = uri
    return manifest_table(ids, images, split), [u for u in files if not is_image_file(u)]


def absolute_uri(uri: str, base: str) -> str:
    """``uri`` with a relative path resolved against the folder ``base`` (a path or URI; a
    relative local ``base`` against the working directory); a tar member's shard likewise.
    Absolute paths and URIs with a scheme come back unchanged."""
    parts = split_tar_uri(uri)
    if parts is not None:
        return tar_member_uri(absolute_uri(parts[0], base), parts[1])
    if uri.startswith("/") or "://" in uri:
        return uri
    if is_remote(base):
        scheme, _, path = base.partition("://")
        return f"{scheme}://{posixpath.normpath(join(path, uri))}"
    return os.path.normpath(os.path.join(os.path.abspath(base), uri))


def absolute_uris(table: pa.Table, base: str) -> tuple[pa.Table, int]:
    """``table`` with every relative ``uri`` resolved against ``base``, and how many were."""
    uris = table.column("uri")
    tar = pc.starts_with(uris, TAR_PREFIX)
    absolute = pc.if_else(tar, pc.match_substring_regex(uris, rf"^tar://.*::{_ABSOLUTE[1:]}"),
                          pc.match_substring_regex(uris, _ABSOLUTE))
    relative = pc.invert(pc.fill_null(absolute, True))
    count = pc.sum(relative).as_py() or 0
    if not count:
        return table, 0
    resolved = [absolute_uri(u, base) if r else u
                for u, r in zip(uris.to_pylist(), relative.to_pylist())]
    index = table.schema.get_field_index("uri")
    return table.set_column(index, table.schema.field(index), pa.array(resolved, pa.string())), count


def _csv_types() -> dict[str, pa.DataType]:
    return {f.name: f.type for f in MANIFEST_SCHEMA if not pa.types.is_list(f.type)}


def read_manifest(uri: str) -> pa.Table:
    """Read a manifest from Parquet (a file or a folder of files) or CSV, validated.

    Relative image paths are resolved against the manifest's own folder (the folder itself for
    a folder of Parquet files), with a warning: they name no file on another machine otherwise.
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise ManifestError(uri, "no such file or folder")
    try:
        if path.endswith(".csv"):
            with fs.open(path, "rb") as f:
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types=_csv_types(), strings_can_be_null=True))
        else:
            table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(uri, f"unreadable: {exc}") from exc
    folder = uri if fs.isdir(path) else posixpath.dirname(uri.rstrip("/")) or "."
    if not is_remote(folder):
        folder = os.path.abspath(folder)
    table, count = absolute_uris(validate_manifest(table, uri), folder)
    if count:
        log.warning("manifest %s: %d relative image path(s) resolved against its folder %s",
                    redact(uri), count, redact(folder))
    return table


def write_manifest(table: pa.Table, uri: str) -> None:
    """Write a validated manifest as one Parquet file, atomically (:func:`storage.put_atomic`);
    relative local image paths are written resolved against the working directory."""
    table, _ = absolute_uris(validate_manifest(table, uri), os.getcwd())
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

"""Google Landmarks v2: the official CSVs, the folder layout and the tar shards.

Expected layout under ``root`` (any fsspec URI, e.g. a local folder or ``s3://bucket/gldv2``)::

    train.csv                      id,url,landmark_id
    train_clean.csv                landmark_id,images        (images: space-separated ids)
    train_label_to_category.csv    landmark_id,category
    index.csv                      id
    index_image_to_landmark.csv    id,landmark_id            (optional)
    test.csv                       id
    retrieval_solution_v2.1.csv    id,images,Usage           (images: ids or "None")
    train/<a>/<b>/<c>/<id>.jpg     folder layout (a, b, c: the first three characters of id)
    train/images_NNN.tar           tar layout: members <a>/<b>/<c>/<id>.jpg
    train/md5.images_NNN.txt       optional: "<md5> images_NNN.tar", checked when present

``index`` and ``test`` images live under ``index/`` and ``test/`` the same way. A CSV is looked
up in ``root`` first, then in the subset folder. Malformed rows raise :class:`GLDv2FormatError`
naming the file and the line numbers.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cvnet.data.manifest import (
    TarIndex, cache_tar_index, is_image_file, list_files, manifest_table, scan_tar, scheme_uri,
    tar_index, tar_member_uri,
)
from cvnet.storage import filesystem, join, redact

SPLITS = {"train": "train", "train_clean": "train", "index": "index", "test": "test"}
LAYOUTS = ("folder", "tar")
MAX_REPORTED = 20
_ID_RE = re.compile(r"^[0-9A-Za-z_-]{3,}$")
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")


class GLDv2FormatError(ValueError):
    """A GLDv2 file is malformed; ``problems`` lists ``(line, reason)`` pairs."""

    def __init__(self, uri: str, problems: list[tuple[int, str]], total: int | None = None):
        total = len(problems) if total is None else total
        shown = "; ".join(f"line {line}: {reason}" if line else reason for line, reason in problems)
        more = f" (and {total - len(problems)} more)" if total > len(problems) else ""
        super().__init__(redact(f"{uri}: {shown}{more}"))
        self.uri = uri
        self.problems = problems
        self.total = total


class ShardChecksumError(OSError):
    """A tar shard's md5 does not match its md5 list."""

    def __init__(self, uri: str, expected: str, actual: str):
        super().__init__(f"{uri}: md5 {actual} does not match the listed {expected}")
        self.uri = uri
        self.expected = expected
        self.actual = actual


# ---- CSV parsing ----------------------------------------------------------------------------

def _image_id(value: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(f"bad image id {value!r} (need 3+ characters of [0-9A-Za-z_-])")
    return value


def _landmark(value: str) -> int:
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"landmark_id {value!r} is not an integer") from None
    if out < 0:
        raise ValueError(f"landmark_id {value!r} is negative")
    return out


def _id_list(value: str) -> list[str]:
    ids = [_image_id(v) for v in value.split()]
    if not ids:
        raise ValueError("empty image list")
    return ids


def _id_list_or_none(value: str) -> list[str] | None:
    return None if value.strip() == "None" else _id_list(value)


def _text(value: str) -> str:
    return value


@dataclass(frozen=True)
class CsvSpec:
    columns: tuple[tuple[str, Callable[[str], object], pa.DataType], ...]
    unique: str | None  # column whose values must not repeat


_IDS = pa.list_(pa.string())
CSV_SPECS: dict[str, CsvSpec] = {
    "train.csv": CsvSpec((("id", _image_id, pa.string()), ("url", _text, pa.string()),
                          ("landmark_id", _landmark, pa.int64())), "id"),
    "train_clean.csv": CsvSpec((("landmark_id", _landmark, pa.int64()), ("images", _id_list, _IDS)),
                               "landmark_id"),
    "train_label_to_category.csv": CsvSpec((("landmark_id", _landmark, pa.int64()),
                                            ("category", _text, pa.string())), "landmark_id"),
    "index.csv": CsvSpec((("id", _image_id, pa.string()),), "id"),
    "test.csv": CsvSpec((("id", _image_id, pa.string()),), "id"),
    "index_image_to_landmark.csv": CsvSpec((("id", _image_id, pa.string()),
                                            ("landmark_id", _landmark, pa.int64())), "id"),
    "retrieval_solution_v2.1.csv": CsvSpec((("id", _image_id, pa.string()),
                                            ("images", _id_list_or_none, _IDS),
                                            ("Usage", _text, pa.string())), "id"),
}


def _spec_for(uri: str) -> CsvSpec:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name not in CSV_SPECS:
        raise ValueError(f"{uri}: unknown GLDv2 CSV {name!r}; known: {sorted(CSV_SPECS)}")
    return CSV_SPECS[name]


def parse_gldv2_csv(stream: io.TextIOBase, uri: str, spec: CsvSpec) -> pa.Table:
    """Parse an open GLDv2 CSV text stream with ``spec`` (extra columns are ignored)."""
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        raise GLDv2FormatError(uri, [(1, "empty file, no header")])
    header = [h.strip() for h in header]
    names = [name for name, _, _ in spec.columns]
    missing = [n for n in names if n not in header]
    if missing:
        raise GLDv2FormatError(uri, [(1, f"header {header} lacks column(s) {missing}")])
    positions = [header.index(n) for n in names]
    values: list[list[object]] = [[] for _ in names]
    seen: dict[object, int] = {}
    problems: list[tuple[int, str]] = []
    total = 0
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        try:
            if len(row) != len(header):
                raise ValueError(f"{len(row)} fields, header has {len(header)}")
            parsed = [conv(row[pos].strip()) for pos, (_, conv, _) in zip(positions, spec.columns)]
            if spec.unique is not None:
                key = parsed[names.index(spec.unique)]
                if key in seen:
                    raise ValueError(f"duplicate {spec.unique} {key!r} (first on line {seen[key]})")
                seen[key] = line
        except ValueError as exc:
            total += 1
            if len(problems) < MAX_REPORTED:
                problems.append((line, str(exc)))
            continue
        for column, value in zip(values, parsed):
            column.append(value)
    if problems:
        raise GLDv2FormatError(uri, problems, total)
    return pa.table({name: pa.array(col, type=typ) for (name, _, typ), col in zip(spec.columns, values)})


def _fast_column(column: pa.ChunkedArray, conv: Callable[[str], object]) -> pa.ChunkedArray | None:
    """Vectorised twin of one converter; ``None`` when any value would fail (or might)."""
    column = pc.utf8_trim_whitespace(column)
    if conv is _text:
        return column
    if conv is _image_id:
        return column if pc.all(pc.match_substring_regex(column, _ID_RE.pattern)).as_py() else None
    if conv is _landmark:
        if not pc.all(pc.match_substring_regex(column, r"^[0-9]{1,18}$")).as_py():
            return None
        return pc.cast(column, pa.int64())
    is_none = pc.equal(column, "None") if conv is _id_list_or_none else pc.is_null(column)
    lists = pc.utf8_split_whitespace(column)
    ids_ok = pc.all(pc.match_substring_regex(pc.list_flatten(lists), _ID_RE.pattern)).as_py()
    non_empty = pc.all(pc.or_(pc.greater(pc.list_value_length(lists), 0), is_none)).as_py()
    if ids_ok is False or not non_empty:  # ids_ok is None when every row is "None"
        return None
    return pc.if_else(is_none, pa.scalar(None, lists.type), lists)


def _read_fast(fs: fsspec.AbstractFileSystem, path: str, spec: CsvSpec) -> pa.Table | None:
    """Parse with Arrow's CSV reader; ``None`` when anything is off (the slow path reports it)."""
    names = [name for name, _, _ in spec.columns]
    options = pacsv.ConvertOptions(include_columns=names, column_types=dict.fromkeys(names, pa.string()))
    try:
        with fs.open(path, "rb") as f:
            raw = pacsv.read_csv(f, convert_options=options)
    except (pa.ArrowInvalid, pa.ArrowKeyError):
        return None
    if raw.num_rows == 0:
        return None
    columns = {}
    for name, conv, typ in spec.columns:
        column = _fast_column(raw.column(name), conv)
        if column is None:
            return None
        columns[name] = column.cast(typ)
    if spec.unique is not None and pc.count_distinct(columns[spec.unique]).as_py() != raw.num_rows:
        return None
    return pa.table(columns)


def read_gldv2_csv(uri: str) -> pa.Table:
    """Read one of the official GLDv2 CSVs (chosen by file name) into an Arrow table.

    A well-formed file is parsed by Arrow; otherwise the row-by-row parser names every bad line.
    """
    spec = _spec_for(uri)
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: GLDv2 CSV not found")
    table = _read_fast(fs, path, spec)
    if table is not None:
        return table
    try:
        with fs.open(path, "rt", encoding="utf-8", newline="") as stream:
            return parse_gldv2_csv(stream, uri, spec)
    except UnicodeDecodeError as exc:
        raise GLDv2FormatError(uri, [(0, f"not UTF-8 text: {exc}")]) from exc


def find_csv(root: str, name: str, subset: str | None = None) -> str | None:
    """The URI of ``name`` in ``root`` or in ``root/<subset>``; ``None`` when absent."""
    candidates = [join(root, name)] + ([join(root, subset, name)] if subset else [])
    for uri in candidates:
        fs, path = filesystem(uri)
        if fs.exists(path):
            return uri
    return None


def _require_csv(root: str, name: str, subset: str) -> str:
    uri = find_csv(root, name, subset)
    if uri is None:
        raise FileNotFoundError(f"{join(root, name)}: GLDv2 CSV not found (also looked in {subset}/)")
    return uri


# ---- image locations ------------------------------------------------------------------------

def member_name(image_id: str) -> str:
    """The relative path of an image in the folder layout and inside tar shards."""
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def folder_uri(root: str, subset: str, image_id: str) -> str:
    return join(root, subset, member_name(image_id))


def list_shards(root: str, subset: str) -> list[str]:
    """The tar shards ``<root>/<subset>/images_*.tar``, sorted."""
    fs, path = filesystem(join(root, subset))
    return sorted(scheme_uri(root, p) for p in fs.glob(f"{path}/images_*.tar"))


def read_md5_list(uri: str) -> dict[str, str]:
    """Parse an md5 list (``<md5> <file name>`` per line) into ``{file name: md5}``."""
    fs, path = filesystem(uri)
    out: dict[str, str] = {}
    problems = []
    with fs.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not _MD5_RE.match(parts[0]):
                problems.append((line_no, f"expected '<md5> <file>', got {line.strip()!r}"))
                continue
            out[parts[1].lstrip("*")] = parts[0].lower()
    if problems:
        raise GLDv2FormatError(uri, problems[:MAX_REPORTED], len(problems))
    return out


class _HashingReader(io.RawIOBase):
    """A read-only stream that feeds every byte read through md5."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.md5 = hashlib.md5()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.md5.update(data)
        return len(data)

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.md5.hexdigest()


def index_shard(tar_uri: str, expected_md5: str | None = None) -> TarIndex:
    """Index one shard's members (cached for :func:`read_image_bytes`), checking its md5.

    With an md5 the shard is read once, front to back, for both the index and the hash.
    """
    if expected_md5 is None:
        return tar_index(tar_uri)
    fs, path = filesystem(tar_uri)
    with fs.open(path, "rb") as f:
        reader = _HashingReader(f)
        index = scan_tar(io.BufferedReader(reader), tar_uri, fs.size(path), stream=True)
        actual = reader.drain()
    if actual != expected_md5:
        raise ShardChecksumError(tar_uri, expected_md5, actual)
    cache_tar_index(tar_uri, index)
    return index


def _shard_md5(tar_uri: str) -> str | None:
    folder, name = tar_uri.rsplit("/", 1)
    md5_uri = join(folder, f"md5.{name[:-len('.tar')]}.txt")
    fs, path = filesystem(md5_uri)
    if not fs.exists(path):
        return None
    listed = read_md5_list(md5_uri)
    if name not in listed:
        raise GLDv2FormatError(md5_uri, [(0, f"no md5 listed for {name}")])
    return listed[name]


def shard_members(root: str, subset: str, verify_md5: bool = True) -> dict[str, str]:
    """``{member name: shard URI}`` over all shards of a subset (md5 lists checked if present)."""
    shards = list_shards(root, subset)
    if not shards:
        raise FileNotFoundError(f"{join(root, subset)}: no images_*.tar shards")
    out: dict[str, str] = {}
    for tar_uri in shards:
        for member in index_shard(tar_uri, _shard_md5(tar_uri) if verify_md5 else None):
            out.setdefault(member, tar_uri)
    return out


# ---- manifest -------------------------------------------------------------------------------

def _split_rows(root: str, split: str) -> tuple[list[str], list[int | None]]:
    """Image ids and landmark ids of a split, from its CSVs."""
    subset = SPLITS[split]
    if split == "train":
        table = read_gldv2_csv(_require_csv(root, "train.csv", subset))
        return table.column("id").to_pylist(), table.column("landmark_id").to_pylist()
    if split == "train_clean":
        uri = _require_csv(root, "train_clean.csv", subset)
        table = read_gldv2_csv(uri)
        ids: list[str] = []
        labels: list[int | None] = []
        first: dict[str, int] = {}
        for landmark, images in zip(table.column("landmark_id").to_pylist(), table.column("images").to_pylist()):
            for image_id in images:
                if image_id in first:
                    raise GLDv2FormatError(uri, [(0, f"image {image_id!r} listed under landmarks "
                                                     f"{first[image_id]} and {landmark}")])
                first[image_id] = landmark
                ids.append(image_id)
                labels.append(landmark)
        return ids, labels
    table = read_gldv2_csv(_require_csv(root, f"{split}.csv", subset))
    ids = table.column("id").to_pylist()
    labels_uri = find_csv(root, "index_image_to_landmark.csv", subset) if split == "index" else None
    if labels_uri is None:
        return ids, [None] * len(ids)
    mapping = dict(zip(*(read_gldv2_csv(labels_uri).column(c).to_pylist() for c in ("id", "landmark_id"))))
    return ids, [mapping.get(i) for i in ids]


def gldv2_manifest(root: str, split: str = "train_clean", layout: str = "folder",
                   verify_md5: bool = True) -> pa.Table:
    """The image manifest of a GLDv2 split (``train``, ``train_clean``, ``index``, ``test``).

    ``layout="folder"`` points each image at ``<root>/<subset>/<a>/<b>/<c>/<id>.jpg``;
    ``layout="tar"`` at its member in the subset's shards (``tar://<member>::<shard>``), and
    raises if a listed image is in no shard.
    """
    return _manifest(root, split, layout, verify_md5, inventory=False)[0]


def gldv2_inventory(root: str, split: str = "train_clean", layout: str = "folder",
                    verify_md5: bool = True) -> tuple[pa.Table, list[str]]:
    """The manifest of a split (as :func:`gldv2_manifest`) and the URIs of every image its subset
    holds, listed in the split's CSV or not: the image files under ``<root>/<subset>/`` (one
    recursive listing), or the members of its shards."""
    return _manifest(root, split, layout, verify_md5, inventory=True)


def _manifest(root: str, split: str, layout: str, verify_md5: bool,
              inventory: bool) -> tuple[pa.Table, list[str]]:
    if split not in SPLITS:
        raise ValueError(f"unknown GLDv2 split {split!r}; choose one of {sorted(SPLITS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown GLDv2 layout {layout!r}; choose one of {LAYOUTS}")
    subset = SPLITS[split]
    ids, labels = _split_rows(root, split)
    if layout == "folder":
        uris = [folder_uri(root, subset, i) for i in ids]
        found = [u for u in list_files(join(root, subset)) if is_image_file(u)] if inventory else []
        return manifest_table(ids, uris, split, labels), found
    members = shard_members(root, subset, verify_md5)
    uris = []
    absent = []
    for image_id in ids:
        shard = members.get(member_name(image_id))
        if shard is None:
            absent.append(image_id)
        else:
            uris.append(tar_member_uri(shard, member_name(image_id)))
    if absent:
        raise GLDv2FormatError(join(root, subset), [(0, f"image {i!r} is in no images_*.tar shard")
                                                    for i in absent[:MAX_REPORTED]], len(absent))
    found = [tar_member_uri(shard, m) for m, shard in members.items()] if inventory else []
    return manifest_table(ids, uris, split, labels), found

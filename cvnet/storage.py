"""Store URIs: a local folder or any fsspec URI (``s3://bucket/prefix`` through s3fs).

An S3-compatible endpoint is taken from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
unless given explicitly; credentials always come from the standard AWS chain and are never
logged (:func:`redact` strips them from anything that is).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

DEFAULT_STORE = "./cvnet-store"


def default_store() -> str:
    """The store root: ``CVNET_STORE`` or ``./cvnet-store``."""
    return os.environ.get("CVNET_STORE") or DEFAULT_STORE


def s3_endpoint() -> str | None:
    """The S3 endpoint to use, from the standard environment variables (``--endpoint-url``
    sets them)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (no scheme)."""
    protocol, path = fsspec.core.split_protocol(uri)
    protocol = protocol or "file"
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        endpoint = s3_endpoint()
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    if protocol == "file":
        path = os.path.abspath(path)
    return fsspec.filesystem(protocol, **options), path


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with ``/`` (also for local paths)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_remote(uri: str) -> bool:
    return fsspec.core.split_protocol(uri)[0] not in (None, "file", "local")


_SECRET_RE = re.compile(
    r"(?i)((?:aws_)?(?:secret_access_key|access_key_id|session_token|secret|password|token)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',}]+)"
)
_URL_CRED_RE = re.compile(r"(://)([^/@\s:]+):([^/@\s]+)@")


def redact(text: str) -> str:
    """Remove credentials (key=value pairs and user:password@ in URLs) from ``text``."""
    text = _SECRET_RE.sub(lambda m: m.group(1) + "***", text)
    return _URL_CRED_RE.sub(r"\1***:***@", text)


# ---------------------------------------------------------------------------------------------
# Shard commit protocol (exactly-once publication, identical on a local disk and on S3).
#
#   <output>/_attempts/<attempt-id>/<shard-id>/<name>-<part>.parquet   data, invisible to readers
#   <output>/_commits/<shard-id>.json                                 one commit file per shard
#   <output>/_COMMITTED.json                                          job summary, written last
#
# A shard becomes visible by writing its commit file, a single object (one PUT on S3, a rename of
# a finished temporary file on a local disk): no rename of data, no partially visible shard. The
# first commit of a shard wins; later attempts of the same shard are refused and their files are
# garbage. Readers list ``_commits/`` and read only the files a commit names.
# ---------------------------------------------------------------------------------------------

COMMITS_DIR = "_commits"
ATTEMPTS_DIR = "_attempts"
JOB_COMMIT = "_COMMITTED.json"


class CommitError(RuntimeError):
    """A commit is inconsistent: wrong config hash, missing file or malformed commit file."""


@dataclass(frozen=True)
class ShardCommit:
    """What one committed shard holds: files (relative to the output) and row counts by name."""

    shard: str
    attempt: str
    config_hash: str
    files: dict[str, list[str]]
    rows: dict[str, int]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "ShardCommit":
        try:
            data = json.loads(text)
            return cls(shard=data["shard"], attempt=data["attempt"],
                       config_hash=data["config_hash"], files=data["files"], rows=data["rows"])
        except (ValueError, KeyError, TypeError) as err:
            raise CommitError(f"{where}: malformed commit file ({err!r})") from err


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable short hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def new_attempt_id() -> str:
    """A unique, time-ordered attempt id (``20261127T163500-1a2b3c4d``)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def attempt_uri(output: str, attempt: str, shard: str) -> str:
    """The folder where ``attempt`` writes the files of ``shard``."""
    return join(output, ATTEMPTS_DIR, attempt, shard)


def put_atomic(uri: str, data: bytes, exclusive: bool = False) -> bool:
    """Write ``data`` so that readers see either nothing (or the old object) or the whole one.

    On S3 one PUT; locally a hidden temporary file (``.<name>.<hex>.tmp``, skipped by folder
    readers), fsynced, then renamed over ``uri``, and removed if anything fails. With
    ``exclusive``, an existing object is left alone and ``False`` is returned: atomic on a
    local disk through ``link``, on S3 a conditional PUT (``If-None-Match: *``), so of two
    writers exactly one creates the object.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        try:
            fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")  # one PUT
        except FileExistsError:  # 412 Precondition Failed: the object exists
            return False
        return True
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read().decode()


def _exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)


def commit_shard(output: str, commit: ShardCommit) -> bool:
    """Publish one shard; ``False`` (and nothing written) when the shard is already committed.

    Every file named by the commit must exist: a commit never points at missing data.
    """
    target = join(output, COMMITS_DIR, f"{commit.shard}.json")
    if _exists(target):
        return False
    for name, files in commit.files.items():
        for rel in files:
            if not _exists(join(output, rel)):
                raise CommitError(f"shard {commit.shard}: {name} file {rel} is missing")
    return put_atomic(target, commit.to_json().encode(), exclusive=True)


def committed_shards(output: str, expected_hash: str | None = None) -> dict[str, ShardCommit]:
    """The committed shards of ``output`` by shard id (empty when nothing is committed).

    With ``expected_hash``, a commit made under another config raises :class:`CommitError`
    (a rerun must not mix outputs of two configs).
    """
    fs, path = filesystem(join(output, COMMITS_DIR))
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    shards: dict[str, ShardCommit] = {}
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        where = join(output, COMMITS_DIR, name)
        commit = ShardCommit.from_json(_read_text(where), where)
        if expected_hash is not None and commit.config_hash != expected_hash:
            raise CommitError(
                f"{output}: shard {commit.shard} was committed with config {commit.config_hash}, "
                f"this job has config {expected_hash}; use another output or the same config")
        shards[commit.shard] = commit
    return shards


def committed_files(output: str, name: str) -> list[str]:
    """URIs of the committed files called ``name`` (e.g. ``descriptors``), in shard order."""
    return [join(output, rel) for _, commit in sorted(committed_shards(output).items())
            for rel in commit.files.get(name, [])]


def commit_job(output: str, shards: Mapping[str, ShardCommit], expected_hash: str,
               summary: Mapping[str, Any]) -> str:
    """Write ``<output>/_COMMITTED.json``: every shard (``shards``: :func:`committed_shards`
    with ``expected_hash``), its row counts, the config hash."""
    body = dict(summary, config_hash=expected_hash,
                shards={k: {"attempt": c.attempt, "rows": c.rows} for k, c in sorted(shards.items())})
    uri = join(output, JOB_COMMIT)
    put_atomic(uri, json.dumps(body, sort_keys=True, indent=1).encode())
    return uri


def remove_orphan_attempts(output: str, shards: Mapping[str, ShardCommit]) -> list[str]:
    """Delete attempt folders no commit of ``shards`` (:func:`committed_shards`) refers to
    (left by crashed or duplicate attempts)."""
    live = {c.attempt for c in shards.values()}
    fs, path = filesystem(join(output, ATTEMPTS_DIR))
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    removed = []
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] not in live:
            fs.rm(entry, recursive=True)
            removed.append(entry)
    return removed

"""Store URIs: a local folder or any fsspec URI (``s3://bucket/prefix`` through s3fs).

An S3-compatible endpoint is taken from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
unless given explicitly; credentials always come from the standard AWS chain and are never
logged (:func:`redact` strips them from anything that is).
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
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


def file_sha256(uri: str) -> str:
    """SHA-256 of a file (streamed; local or remote)."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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

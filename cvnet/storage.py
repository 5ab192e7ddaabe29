"""Store URIs: a local folder or any fsspec URI (``s3://bucket/prefix`` through s3fs).

An S3-compatible endpoint is taken from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
unless given explicitly; credentials always come from the standard AWS chain and are never
logged (:func:`redact` strips them from anything that is).
"""
from __future__ import annotations

import os
import re
from typing import Any

import fsspec

DEFAULT_STORE = "./cvnet-store"


def default_store() -> str:
    """The store root: ``CVNET_STORE`` or ``./cvnet-store``."""
    return os.environ.get("CVNET_STORE") or DEFAULT_STORE


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: explicit, else the standard environment variables."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (no scheme)."""
    protocol, path = fsspec.core.split_protocol(uri)
    protocol = protocol or "file"
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        endpoint = s3_endpoint(endpoint_url)
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

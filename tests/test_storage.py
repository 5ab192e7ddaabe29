"""Store URIs and atomic writes on a local disk and on a real S3-compatible server (moto)."""
from __future__ import annotations

import hashlib
import threading

import pytest

from cvnet import storage


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def _read(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)
    return fs.cat_file(path)


def test_exclusive_put_keeps_the_first_object(folder):
    uri = storage.join(folder, "c", "x.json")
    assert storage.put_atomic(uri, b"one", exclusive=True) is True
    assert storage.put_atomic(uri, b"two", exclusive=True) is False
    assert _read(uri) == b"one"
    storage.put_atomic(uri, b"three")  # a plain put replaces it whole
    assert _read(uri) == b"three"
    fs, path = storage.filesystem(storage.join(folder, "c"))
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] == ["x.json"]  # no temp left


def test_exclusive_puts_racing_have_one_winner(folder):
    """Eight writers create the same object at once (a conditional PUT on S3): one wins."""
    uri = storage.join(folder, "race.json")
    wins = []
    threads = [threading.Thread(target=lambda i=i: wins.append(storage.put_atomic(uri, str(i).encode(), True)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_file_sha256_streams_local_and_remote(folder):
    data = b"cvnet" * 100_000
    uri = storage.join(folder, "blob.bin")
    storage.put_atomic(uri, data)
    assert storage.file_sha256(uri) == hashlib.sha256(data).hexdigest()


def test_redact_and_join():
    assert storage.redact("aws_secret_access_key=abc s3://u:p@host/x") == "aws_secret_access_key=*** s3://***:***@host/x"
    assert storage.join("s3://b/", "/a/", "c") == "s3://b/a/c"

"""The shard commit protocol on a local disk and on a real S3-compatible server (moto)."""
from __future__ import annotations

import json

import pytest

from cvnet import storage
from cvnet.storage import CommitError, ShardCommit


def _write_shard(output: str, attempt: str, shard: str, rows: int, chash: str = "h1") -> ShardCommit:
    folder = storage.attempt_uri(output, attempt, shard)
    rel = f"{storage.ATTEMPTS_DIR}/{attempt}/{shard}/descriptors-0.parquet"
    storage.put_atomic(storage.join(folder, "descriptors-0.parquet"), b"x" * rows)
    return ShardCommit(shard=shard, attempt=attempt, config_hash=chash,
                       files={"descriptors": [rel]}, rows={"descriptors": rows})


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/features/out"


def test_only_committed_shards_are_visible(output):
    first = _write_shard(output, "a1", "shard-00000", 3)
    _write_shard(output, "a1", "shard-00001", 2)  # written, never committed (crash)
    assert storage.committed_shards(output) == {}
    assert storage.commit_shard(output, first) is True
    shards = storage.committed_shards(output, expected_hash="h1")
    assert list(shards) == ["shard-00000"]
    assert shards["shard-00000"] == first
    assert storage.committed_files(output, "descriptors") == [
        storage.join(output, "_attempts/a1/shard-00000/descriptors-0.parquet")]


def test_first_commit_wins_and_orphans_are_removed(output):
    first = _write_shard(output, "a1", "shard-00000", 3)
    second = _write_shard(output, "a2", "shard-00000", 3)
    assert storage.commit_shard(output, first) is True
    assert storage.commit_shard(output, second) is False
    assert storage.committed_shards(output)["shard-00000"].attempt == "a1"
    removed = storage.remove_orphan_attempts(output, storage.committed_shards(output))
    assert [r.rstrip("/").rsplit("/", 1)[-1] for r in removed] == ["a2"]
    fs, path = storage.filesystem(storage.join(output, "_attempts"))
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] == ["a1"]


def test_commit_refuses_missing_files_and_other_configs(output):
    commit = _write_shard(output, "a1", "shard-00000", 3)
    broken = ShardCommit(shard="shard-00001", attempt="a1", config_hash="h1",
                         files={"descriptors": ["_attempts/a1/shard-00001/nope.parquet"]},
                         rows={"descriptors": 1})
    with pytest.raises(CommitError, match="shard-00001.*nope.parquet"):
        storage.commit_shard(output, broken)
    assert storage.committed_shards(output) == {}
    storage.commit_shard(output, commit)
    with pytest.raises(CommitError, match="shard-00000 was committed with config h1"):
        storage.committed_shards(output, expected_hash="other")


def test_job_commit_lists_shards_and_rows(output):
    storage.commit_shard(output, _write_shard(output, "a1", "shard-00000", 3))
    storage.commit_shard(output, _write_shard(output, "a2", "shard-00001", 2))
    uri = storage.commit_job(output, storage.committed_shards(output, "h1"), "h1",
                             {"images": 5})
    fs, path = storage.filesystem(uri)
    body = json.loads(fs.cat_file(path))
    assert body["config_hash"] == "h1" and body["images"] == 5
    assert body["shards"] == {"shard-00000": {"attempt": "a1", "rows": {"descriptors": 3}},
                              "shard-00001": {"attempt": "a2", "rows": {"descriptors": 2}}}


def test_malformed_commit_names_the_file(tmp_path):
    output = str(tmp_path / "out")
    storage.put_atomic(storage.join(output, "_commits", "shard-00000.json"), b"{not json")
    with pytest.raises(CommitError, match="shard-00000.json: malformed"):
        storage.committed_shards(output)


def test_exclusive_put_keeps_the_first_object(tmp_path):
    uri = str(tmp_path / "c" / "x.json")
    assert storage.put_atomic(uri, b"one", exclusive=True) is True
    assert storage.put_atomic(uri, b"two", exclusive=True) is False
    assert open(uri, "rb").read() == b"one"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["x.json"]  # no temp left


def test_config_hash_ignores_key_order():
    assert storage.config_hash({"a": 1, "b": [1, 2]}) == storage.config_hash({"b": [1, 2], "a": 1})
    assert storage.config_hash({"a": 1}) != storage.config_hash({"a": 2})

"""The committed-table layer (no Ray): keys, versions, take, leases, on a local folder and S3."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pyarrow as pa
import pytest

from cvnet import tables
from cvnet.storage import join

SCHEMA = pa.schema([pa.field("image_id", pa.string(), nullable=False), pa.field("x", pa.float32())])


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An output folder on a local disk, or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket") + "/out"


def _rows(ids: list[str], start: float = 0.0) -> pa.Table:
    return pa.table({"image_id": ids, "x": [start + i for i in range(len(ids))]}, schema=SCHEMA)


def _writer(root: str, owner: str = "test") -> tables.TableWriter:
    lease = tables.Lease(root, owner, ttl_s=30).acquire()
    table = tables.open_or_create(join(root, "t.lance"), SCHEMA, "demo", "image_id", {"model": "m1"})
    return tables.TableWriter(table, lease)


def test_commits_are_versions_keys_once_and_take_by_key(root):
    uri = join(root, "t.lance")
    writer = _writer(root)
    try:
        assert writer.version == 1 and tables.Table.open(uri).num_rows() == 0
        v2 = writer.commit(tables.write_table_fragments(uri, _rows(["a", "b", "c"])), ["a", "b", "c"])
        v3 = writer.commit(tables.write_table_fragments(uri, _rows(["d"], 10)), ["d"])
        assert (v2, v3) == (2, 3)
        # a key is committed at most once, and nothing is written when refused
        with pytest.raises(tables.DuplicateKeys, match=r"\['b'\] already committed"):
            writer.commit(tables.write_table_fragments(uri, _rows(["b", "e"])), ["b", "e"])
        assert tables.Table.open(uri).version == 3
        # readers by version and by key (in the order asked)
        assert tables.read_table(uri, version=2).column("image_id").to_pylist() == ["a", "b", "c"]
        assert tables.Table.open(uri).take(["d", "a"]).to_pylist() == [
            {"image_id": "d", "x": 10.0}, {"image_id": "a", "x": 0.0}]
        with pytest.raises(KeyError, match=r"no rows for \['zz'\]"):
            tables.Table.open(uri).take(["a", "zz"])
        # deleting makes keys work to do again, in a new version; old versions stay readable
        assert writer.delete(["a"]) == 4
        assert sorted(tables.Table.open(uri).keys().to_pylist()) == ["b", "c", "d"]
        assert tables.Table.open(uri, version=3).num_rows() == 4
        with pytest.raises(tables.TableError, match="no version 99"):
            tables.Table.open(uri, version=99)
    finally:
        writer.lease.release()


def test_settings_and_columns_are_checked(root):
    _writer(root).lease.release()
    uri = join(root, "t.lance")
    with pytest.raises(tables.SettingsMismatch, match="model: table has 'm1', this run has 'm2'"):
        tables.open_or_create(uri, SCHEMA, "demo", "image_id", {"model": "m2"})
    other = pa.schema([pa.field("image_id", pa.string(), nullable=False), pa.field("y", pa.int64())])
    with pytest.raises(tables.SettingsMismatch, match="columns differ"):
        tables.open_or_create(uri, other, "demo", "image_id", {"model": "m1"})


def test_readers_refuse_what_is_not_committed(root, tmp_path):
    with pytest.raises(tables.NotCommitted, match="no committed table"):
        tables.read_table(join(root, "nothing.lance"))
    # fragments written but never committed are invisible
    writer = _writer(root)
    uri = join(root, "t.lance")
    tables.write_table_fragments(uri, _rows(["ghost"]))
    writer.lease.release()
    assert tables.Table.open(uri).num_rows() == 0


def test_one_lease_holder_among_racing_writers(root):
    """Eight writers race for a free lease: exactly one gets it, the others are told who has it."""
    won, refused = [], []

    def take(i: int) -> None:
        try:
            won.append(tables.Lease(root, f"writer-{i}", ttl_s=30).acquire())
        except tables.LeaseHeld as err:
            refused.append(str(err))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert all(f"held by {won[0].owner} (host" in msg for msg in refused)
    won[0].check()
    won[0].release()
    tables.Lease(root, "next", ttl_s=30).acquire().release()  # released: free at once


def test_lease_of_a_dead_process_is_free_and_a_stale_holder_stops(root, tmp_path):
    # a process that took the lease and died (no release) does not block this host
    code = ("import sys; from cvnet.tables import Lease; Lease(sys.argv[1], 'crashed', ttl_s=600).acquire(); "
            "import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, root], check=True, env=os.environ)
    lease = tables.Lease(root, "rerun", ttl_s=30).acquire()
    assert lease.generation == 2
    # a holder whose lease was taken over refuses to commit
    stale = tables.Lease(root, "rerun", ttl_s=30)
    stale.generation, stale.info = 1, tables.LeaseInfo("old", "h", 1, "t", 0.0, 1e12)
    with pytest.raises(tables.LeaseHeld, match="lease lost"):
        stale.check()
    lease.release()


def test_lease_expires_unless_renewed(tmp_path):
    lease = tables.Lease(str(tmp_path), "a", ttl_s=5).acquire()
    lease._stop.set()  # stop renewing, as a frozen process would
    lease._renewer.join()
    with pytest.raises(tables.LeaseHeld):
        tables.Lease(str(tmp_path), "b").acquire()
    taken = tables.Lease(str(tmp_path), "b").acquire(wait_s=30, poll_s=0.2)
    assert taken.info.acquired_at >= lease.info.expires_at  # taken only once the old one expired
    with pytest.raises(tables.LeaseHeld, match="lease lost"):
        lease.check()
    taken.release()

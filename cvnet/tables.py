"""Committed tables: keyed, versioned, exactly-once tables on a local folder or S3 (Lance).

Every pipeline output (descriptors and rerank features, bad inputs, hard negatives, rankings)
is a Lance dataset whose rows carry a key column (``image_id``, or ``query_id`` for rankings).
The rules, the same on a local folder and on S3 (see ``docs/storage.md``):

- a commit is one Lance transaction: it becomes visible whole, as a new version, or not at all;
- a key is committed at most once: the one writer (the holder of the table's :class:`Lease`)
  refuses fragments whose keys are already committed (:class:`TableWriter`);
- readers see committed versions only, pinned by ``version`` or the latest;
- workers write fragments (data files no version refers to yet) and hand their metadata to the
  writer, so bulk data never passes through the driver.

Nothing here imports Ray.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata, write_fragments

from cvnet import storage

log = logging.getLogger(__name__)

TABLE_META = b"cvnet.table"
LEASE_DIR = "_lease"


class TableError(RuntimeError):
    """A table cannot be read or written as asked."""


class NotCommitted(TableError, FileNotFoundError):
    """No committed table (no Lance version) exists at the URI."""


class SettingsMismatch(TableError):
    """A run's settings differ from those the table was created with."""


class DuplicateKeys(TableError):
    """A commit would add keys that are already committed."""


class LeaseHeld(TableError):
    """Another live writer holds the lease."""


def lance_options(uri: str) -> dict[str, str] | None:
    """Lance ``storage_options`` for ``uri``: the S3 endpoint from ``AWS_ENDPOINT_URL``
    (credentials stay in the AWS environment chain, never here)."""
    if not storage.is_remote(uri):
        return None
    endpoint = storage.s3_endpoint()
    if not endpoint:
        return {}
    return {"endpoint": endpoint, "allow_http": str(endpoint.startswith("http://")).lower()}


def _lance_uri(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.abspath(uri)


# ---- reading ------------------------------------------------------------------------------------

class Table:
    """A committed table at one version (the latest unless pinned)."""

    def __init__(self, uri: str, dataset: lance.LanceDataset):
        self.uri = uri
        self.dataset = dataset
        meta = json.loads((dataset.schema.metadata or {}).get(TABLE_META, b"{}"))
        if "key" not in meta:
            raise TableError(f"{storage.redact(uri)}: not a cvnet table (no {TABLE_META.decode()} metadata)")
        self.name: str = meta["name"]
        self.key: str = meta["key"]
        self.settings: dict[str, Any] = meta["settings"]

    @classmethod
    def open(cls, uri: str, version: int | None = None) -> Table:
        """The committed table at ``uri`` (latest, or ``version``); :class:`NotCommitted` if none."""
        try:
            dataset = lance.dataset(_lance_uri(uri), version=version, storage_options=lance_options(uri))
        except (ValueError, OSError) as err:
            if version is not None and _exists(uri):
                raise TableError(f"{storage.redact(uri)}: no version {version} ({err})") from None
            raise NotCommitted(f"{storage.redact(uri)}: no committed table") from None
        return cls(uri, dataset)

    @property
    def version(self) -> int:
        return self.dataset.version

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def num_rows(self) -> int:
        return self.dataset.count_rows()

    def keys(self) -> pa.Array:
        """The distinct committed keys."""
        column = self.dataset.to_table(columns=[self.key]).column(self.key)
        return pc.unique(column.combine_chunks()) if len(column) else pa.array([], pa.string())

    def read(self, columns: Sequence[str] | None = None, filter: str | None = None) -> pa.Table:
        """Rows of this version (optionally only ``columns``, rows matching a Lance ``filter``)."""
        return self.dataset.to_table(columns=list(columns) if columns else None, filter=filter)

    def take(self, keys: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
        """The rows of ``keys``, in the order given (each key's rows together); ``KeyError``
        names missing keys. Reads only the matching rows of the wanted columns."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return self.dataset.schema.empty_table().select(list(columns) if columns else self.schema.names)
        cols = list(dict.fromkeys([self.key, *(columns or self.schema.names)]))
        found = self.dataset.to_table(columns=cols, filter=pc.field(self.key).isin(wanted))
        position = {k: i for i, k in enumerate(wanted)}
        order = pc.array_sort_indices(pa.array([position[k] for k in found.column(self.key).to_pylist()]))
        found = found.take(order)
        if len(missing := set(wanted) - set(found.column(self.key).to_pylist())):
            raise KeyError(f"{storage.redact(self.uri)}: no rows for {sorted(missing)[:5]} ({len(missing)} keys)")
        return found.select(list(columns)) if columns else found


def read_table(uri: str, columns: Sequence[str] | None = None, version: int | None = None) -> pa.Table:
    """All committed rows of the table at ``uri`` (latest or ``version``)."""
    return Table.open(uri, version).read(columns)


def _exists(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)


def table_schema(schema: pa.Schema, name: str, key: str, settings: Mapping[str, Any]) -> pa.Schema:
    """``schema`` with the table's name, key and settings in its metadata."""
    if key not in schema.names:
        raise ValueError(f"table {name}: key column {key!r} is not in the schema {schema.names}")
    meta = dict(schema.metadata or {})
    meta[TABLE_META] = json.dumps({"name": name, "key": key, "settings": dict(settings)},
                                  sort_keys=True, default=str).encode()
    return schema.with_metadata(meta)


def settings_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings that differ: ``{key: (table's value, requested value)}`` (JSON-normalised)."""
    norm = lambda d: json.loads(json.dumps(dict(d), sort_keys=True, default=str))  # noqa: E731
    have, want = norm(have), norm(want)
    return {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}


def open_or_create(uri: str, schema: pa.Schema, name: str, key: str, settings: Mapping[str, Any]) -> Table:
    """The table at ``uri``, created empty (version 1) if absent; refuses other settings or columns.

    Call it as the lease holder: creation by two writers at once is refused by Lance for one of them.
    """
    try:
        table = Table.open(uri)
    except NotCommitted:
        full = table_schema(schema, name, key, settings)
        try:
            lance.write_dataset(full.empty_table(), _lance_uri(uri), schema=full, mode="create",
                                storage_options=lance_options(uri))
        except OSError as err:  # created meanwhile by another writer: open and check it below
            log.debug("create %s raced: %s", storage.redact(uri), err)
        table = Table.open(uri)
    diff = settings_diff(table.settings, settings)
    if diff:
        shown = "; ".join(f"{k}: table has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
        raise SettingsMismatch(f"{storage.redact(uri)}: settings differ ({shown}); use another output")
    have = [(f.name, f.type) for f in table.schema]
    want = [(f.name, f.type) for f in schema]
    if have != want or table.key != key:
        raise SettingsMismatch(f"{storage.redact(uri)}: columns differ (table {have}, this run {want})")
    return table


# ---- writing --------------------------------------------------------------------------------------

def write_table_fragments(uri: str, rows: pa.Table) -> list[str]:
    """Write ``rows`` as uncommitted fragments of the table at ``uri`` (workers call this);
    returns their metadata as JSON strings for :meth:`TableWriter.commit`."""
    if rows.num_rows == 0:
        return []
    schema = Table.open(uri).schema
    fragments = write_fragments(rows.cast(schema), _lance_uri(uri), schema=schema,
                                storage_options=lance_options(uri))
    return [json.dumps(f.to_json()) for f in fragments]


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease: written as JSON in ``<folder>/_lease/<generation>.json``."""

    owner: str
    host: str
    pid: int
    token: str
    acquired_at: float
    expires_at: float
    released: bool = False

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired_at))
        return f"{self.owner} (host {self.host}, pid {self.pid}) since {since}"

    def is_live(self, now: float) -> bool:
        if self.released or self.expires_at < now:
            return False
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return False  # a crashed process on this machine: no need to wait for the expiry
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """One writer at a time for an output folder, on a local disk or S3.

    Generations ``_lease/00000001.json``, ... are created with create-only writes (``link`` on a
    local disk, ``If-None-Match: *`` on S3), so of two writers taking generation g+1 exactly one
    wins. The holder is the newest generation while it is live: not released, not expired
    (renewed every ``ttl_s / 3`` by a thread), and, on the same host, its process alive. A
    holder that finds a newer generation has lost the lease and stops committing.
    """

    def __init__(self, folder: str, owner: str, ttl_s: float = 60.0):
        self.folder = storage.join(folder, LEASE_DIR)
        self.owner, self.ttl_s = owner, ttl_s
        self.generation: int | None = None
        self.info: LeaseInfo | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _path(self, generation: int) -> str:
        return storage.join(self.folder, f"{generation:08d}.json")

    def _newest(self) -> tuple[int, LeaseInfo | None]:
        fs, path = storage.filesystem(self.folder)
        fs.invalidate_cache(path)
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)] if fs.exists(path) else []
        generations = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
        if not generations:
            return 0, None
        with fs.open(storage.filesystem(self._path(generations[-1]))[1], "rb") as handle:
            return generations[-1], LeaseInfo(**json.loads(handle.read()))

    def _write(self, generation: int, info: LeaseInfo, exclusive: bool) -> bool:
        return storage.put_atomic(self._path(generation), json.dumps(asdict(info)).encode(), exclusive=exclusive)

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for a live holder; :class:`LeaseHeld` names it."""
        deadline = time.monotonic() + wait_s
        while True:
            generation, holder = self._newest()
            now = time.time()
            if holder is None or not holder.is_live(now):
                info = LeaseInfo(self.owner, socket.gethostname(), os.getpid(), uuid.uuid4().hex,
                                 now, now + self.ttl_s)
                if self._write(generation + 1, info, exclusive=True):
                    self.generation, self.info = generation + 1, info
                    self._start_renewal()
                    return self
                continue  # another writer took generation + 1 first: look again
            if time.monotonic() >= deadline:
                left = holder.expires_at - now
                raise LeaseHeld(f"{storage.redact(self.folder)} is held by {holder.describe()}; the lease "
                                f"expires in {left:.0f} s unless renewed: wait for that run, or rerun later")
            time.sleep(poll_s)

    def _start_renewal(self) -> None:
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="cvnet-lease", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as err:  # a failed renewal is caught by check() before any commit
                log.warning("lease %s: renewal failed: %s", storage.redact(self.folder), err)

    def renew(self) -> None:
        assert self.info is not None and self.generation is not None, "renew() before acquire()"
        info = LeaseInfo(**dict(asdict(self.info), expires_at=time.time() + self.ttl_s))
        self._write(self.generation, info, exclusive=False)
        self.info = info

    def check(self) -> None:
        """Raise :class:`LeaseHeld` unless this process still holds the lease with time left."""
        generation, holder = self._newest()
        mine = self.info is not None and holder is not None and holder.token == self.info.token
        if not mine or generation != self.generation or holder.expires_at - time.time() < self.ttl_s / 3:
            who = holder.describe() if holder else "nobody"
            raise LeaseHeld(f"{storage.redact(self.folder)}: lease lost (now held by {who}); not committing")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.info is not None and self.generation is not None:
            self._write(self.generation, LeaseInfo(**dict(asdict(self.info), released=True)), exclusive=False)
        self.info = self.generation = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class TableWriter:
    """Commits fragments to one table exactly once per key; used by the lease holder only.

    ``committed`` is the set of keys at the version the writer last saw; :meth:`commit` refuses
    a key already in it (or twice in one call), checks that the lease is still held, and commits
    against that version. A version that moved underneath (another writer despite the lease)
    reloads the keys before checking.
    """

    def __init__(self, table: Table, lease: Lease | None):
        self.table, self.lease = table, lease
        self.uri = table.uri
        self.committed: set[str] = set(table.keys().to_pylist())
        self.versions_written: list[int] = []

    @property
    def version(self) -> int:
        return self.table.version

    def _refresh_if_moved(self) -> None:
        latest = Table.open(self.uri)
        if latest.version != self.table.version:
            log.warning("%s moved from version %d to %d under this writer; reloading its keys",
                        storage.redact(self.uri), self.table.version, latest.version)
            self.table = latest
            self.committed = set(latest.keys().to_pylist())

    def commit(self, fragments: Sequence[str], keys: Sequence[str], message: str = "") -> int:
        """Commit ``fragments`` (JSON from :func:`write_table_fragments`) holding ``keys``;
        returns the new version. :class:`DuplicateKeys` if any key is committed already."""
        distinct = set(keys)
        if len(distinct) != len(keys):
            raise DuplicateKeys(f"{storage.redact(self.uri)}: keys repeated within one commit")
        if self.lease is not None:
            self.lease.check()
        self._refresh_if_moved()
        if again := distinct & self.committed:
            raise DuplicateKeys(f"{storage.redact(self.uri)}: {sorted(again)[:5]} already committed "
                                f"({len(again)} keys); not committed twice")
        ops = [FragmentMetadata.from_json(f) for f in fragments]
        dataset = lance.LanceDataset.commit(_lance_uri(self.uri), lance.LanceOperation.Append(ops),
                                            read_version=self.table.version, commit_message=message or None,
                                            storage_options=lance_options(self.uri))
        self.table = Table(self.uri, dataset)
        self.committed |= distinct
        self.versions_written.append(dataset.version)
        return dataset.version

    def delete(self, keys: Iterable[str], message: str = "") -> int | None:
        """Remove the rows of ``keys`` in one commit (they become work to do again)."""
        gone = sorted(set(keys) & self.committed)
        if not gone:
            return None
        if self.lease is not None:
            self.lease.check()
        self._refresh_if_moved()
        self.table.dataset.delete(pc.field(self.table.key).isin(gone))
        self.table = Table.open(self.uri)
        self.committed -= set(gone)
        self.versions_written.append(self.table.version)
        log.info("%s: removed %d keys (%s), version %d", storage.redact(self.uri), len(gone),
                 message or "delete", self.table.version)
        return self.table.version

    def collect_garbage(self, older_than: timedelta = timedelta(days=7)) -> None:
        """Remove versions older than ``older_than`` and their unreferenced files. Lance leaves
        data files no version refers to (fragments of crashed workers) for 7 days unless
        verified, so files of a run still writing are never removed."""
        self.table.dataset.cleanup_old_versions(older_than=older_than)

"""The one way every pipeline writes its output: the input keys minus the committed keys run
through Ray Data, and results are committed in shards as they finish.

Workers write their rows as uncommitted table fragments (:func:`fragment_summary`) and return
only the fragments' metadata and keys. The driver holds the output's lease and a
:class:`ShardCommitter` commits whole shards (``commit_rows`` keys, or what arrived within
``commit_every_s``) through :class:`cvnet.tables.TableWriter`, which refuses keys committed
before. A worker killed after writing leaves fragments no version refers to (invisible, and
collected later); a retried batch arrives again and is committed once; a killed driver loses only
uncommitted shards, whose keys are work to do for the rerun. See ``docs/storage.md``.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc
import ray

from cvnet.tables import DuplicateKeys, TableWriter, write_table_fragments

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = pa.schema([("table", pa.string()), ("fragments", pa.list_(pa.string())),
                            ("keys", pa.list_(pa.string()))])


def pending(rows: pa.Table, key: str, done: set[str]) -> pa.Table:
    """The rows of ``rows`` whose ``key`` is not in ``done``."""
    if not done or rows.num_rows == 0:
        return rows
    return rows.filter(pc.invert(pc.is_in(rows.column(key), pa.array(sorted(done), pa.string()))))


def fragment_summary(table: str, uri: str, rows: pa.Table, key: str) -> dict:
    """Write ``rows`` as uncommitted fragments of the table at ``uri``; the summary row the
    worker returns for the driver's commit (distinct keys, in order)."""
    keys = list(dict.fromkeys(rows.column(key).to_pylist()))
    return {"table": table, "fragments": write_table_fragments(uri, rows), "keys": keys}


class ShardCommitter:
    """Buffers worker summaries per table and commits each table in shards, exactly once per key."""

    def __init__(self, writers: Mapping[str, TableWriter], commit_rows: int, commit_every_s: float = 60.0,
                 total: int | None = None):
        self.writers, self.commit_rows, self.commit_every_s = writers, commit_rows, commit_every_s
        self.total = total
        self.buffer: dict[str, list[dict]] = defaultdict(list)
        self.buffered: dict[str, set[str]] = defaultdict(set)
        self.keys: dict[str, list[str]] = defaultdict(list)  # keys committed by this run, per table
        self.repeats = 0  # summaries that arrived twice (a retried batch) and were dropped
        self.last_commit = time.monotonic()

    def add(self, summary: Mapping) -> None:
        name, keys = summary["table"], list(summary["keys"])
        seen = (self.writers[name].committed | self.buffered[name]).intersection(keys)
        if seen and len(seen) == len(keys):
            self.repeats += 1
            log.warning("%s: a batch of %d keys arrived twice (retried); kept once", name, len(keys))
            return
        if seen:
            raise DuplicateKeys(f"{name}: {sorted(seen)[:5]} arrived again inside a new batch; not committed")
        self.buffer[name].append(summary)
        self.buffered[name].update(keys)
        full = sum(len(b) for b in self.buffered.values()) >= self.commit_rows
        if full or time.monotonic() - self.last_commit >= self.commit_every_s:
            self.flush()

    def flush(self) -> None:
        """Commit everything buffered (one commit per table)."""
        for name, summaries in self.buffer.items():
            if not summaries:
                continue
            writer = self.writers[name]
            keys = [k for s in summaries for k in s["keys"]]
            version = writer.commit([f for s in summaries for f in s["fragments"]], keys,
                                    message=f"{len(keys)} keys")
            self.keys[name] += keys
            done = sum(len(k) for k in self.keys.values())
            log.info("committed %d keys to %s (version %d); %d%s done in this run", len(keys), name, version,
                     done, f"/{self.total}" if self.total is not None else "")
        self.buffer.clear()
        self.buffered.clear()
        self.last_commit = time.monotonic()


def run_committed(ds: ray.data.Dataset, committer: ShardCommitter) -> None:
    """Consume ``ds`` (rows of :data:`SUMMARY_SCHEMA`) and commit as results arrive."""
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for summary in batch.to_pylist():
            committer.add(summary)
    committer.flush()


def versions(writers: Mapping[str, TableWriter]) -> dict[str, int]:
    """The current version of each table (what a job logs as read or written)."""
    return {name: w.version for name, w in writers.items()}

"""Hard-negative mining on Ray Data: query shards on an actor pool, the gallery shared through the
object store, the hard-negatives table committed exactly once (:mod:`pipelines.committed`).

The driver reads the features table at its latest version and puts the gallery into the object
store once, in blocks of ``gallery_block_rows`` (``ray.put`` of float32 matrices): every actor
reads them by reference as read-only, zero-copy views of the node's shared memory, one block at
a time, and merges the blocks' partial top-k (:func:`cvnet.search.merge`). Queries are the rows of
the plan (:func:`cvnet.mining.plan_update`): new work only on a re-mine. A row updated in place is
deleted just before its new row is handed to the committer; a crash in between leaves the key
absent, which the rerun's plan searches in full, so nothing is lost or doubled.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from cvnet import features, mining, storage
from cvnet.config import MineConfig
from cvnet.data.manifest import read_manifest
from cvnet.search import Descriptors, TopK, merge, search
from cvnet.tables import Lease, Table, TableError, TableWriter, open_or_create
from pipelines.committed import SUMMARY_SCHEMA, ShardCommitter, fragment_summary

log = logging.getLogger(__name__)

QUERY_SCHEMA = pa.schema([("image_id", pa.string()), ("row", pa.int64()), ("delta", pa.int64()),
                          ("old_ids", pa.list_(pa.string())), ("old_scores", pa.list_(pa.float32()))])
MINE_SUMMARY_SCHEMA = SUMMARY_SCHEMA.append(pa.field("pairs", pa.int64()))
FULL = -1  # ``delta`` of a query searched against the whole gallery


class MineError(RuntimeError):
    """The mining cannot run as asked, or did not finish."""


@dataclass
class MineResult:
    output: str
    rows: int  # rows (re)mined by this run
    pairs: int  # inner products computed by this run
    full_pairs: int  # those of a full re-mine: gallery x gallery
    seconds: float
    plan: mining.Plan
    versions_read: dict[str, int] = field(default_factory=dict)
    versions_written: dict[str, int] = field(default_factory=dict)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Gallery:
    """Object-store references of the gallery: float32 blocks (rows ``starts[i]`` on), ids,
    landmarks (-1: none) and the delta rows of each incremental group."""

    blocks: list[ray.ObjectRef]
    starts: list[int]
    ids: ray.ObjectRef
    landmarks: ray.ObjectRef
    deltas: ray.ObjectRef


def default_output(store: str, features_uri: str, keep: int, precision: str) -> str:
    """``<store>/mining/<features folder name>-keep<keep>-<precision>``: one mining output per
    features table and settings, so that a re-mine finds the previous rows."""
    name = features_uri.rstrip("/").rsplit("/", 1)[-1] or "features"
    return storage.join(store, "mining", f"{name}-keep{keep}-{precision}")


def put_gallery(table: Table, ids: pa.Array, landmarks: np.ndarray, block_rows: int,
                deltas: dict[int, np.ndarray]) -> Gallery:
    """Read the descriptors block by block (the driver holds one block) into the object store."""
    blocks, starts = [], []
    for start in range(0, len(ids), block_rows):
        rows = table.dataset.to_table(columns=["image_id", "descriptor"], offset=start, limit=block_rows)
        if not rows.column("image_id").combine_chunks().equals(ids.slice(start, block_rows)):
            raise MineError(f"{storage.redact(table.uri)}: rows moved between two reads of version {table.version}")
        blocks.append(ray.put(features.descriptors_of(rows)))
        starts.append(start)
    return Gallery(blocks, starts, ray.put(ids.to_numpy(zero_copy_only=False).astype(str)), ray.put(landmarks),
                   ray.put(deltas))


class MineActor:
    """Searches query shards against the object-store gallery; writes hard-negative fragments."""

    def __init__(self, cfg: MineConfig, gallery: Gallery, output: str, version: int):
        import torch

        torch.set_num_threads(max(1, int(cfg.actor_cpus)))
        self.cfg, self.gallery, self.output, self.version = cfg, gallery, output, version
        self.device = "cuda" if cfg.actor_gpus > 0 else "cpu"
        self.ids, self.landmarks = ray.get(gallery.ids), ray.get(gallery.landmarks)
        self.deltas = ray.get(gallery.deltas)

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """Descriptors of gallery ``rows`` (sorted), gathered block by block."""
        out = np.empty((len(rows), features.DESCRIPTOR_DIM), np.float32)
        for start, ref in zip(self.gallery.starts, self.gallery.blocks):
            block = ray.get(ref)
            inside = (rows >= start) & (rows < start + len(block))
            out[inside] = block[rows[inside] - start]
        return out

    def _search(self, queries: Descriptors, subset: np.ndarray | None) -> TopK | None:
        """Top ``keep`` over the gallery (or its rows ``subset``), one block at a time."""
        parts = []
        for start, ref in zip(self.gallery.starts, self.gallery.blocks):
            block = ray.get(ref)  # a read-only view of the object store: nothing copied
            rows = np.arange(start, start + len(block)) if subset is None else \
                subset[(subset >= start) & (subset < start + len(block))]
            if len(rows):
                vectors = block if subset is None else block[rows - start]
                parts.append(search(queries, Descriptors(vectors, self.ids[rows], self.landmarks[rows]),
                                    self.cfg.keep, precision=self.cfg.precision, device=self.device,
                                    memory_budget=self.cfg.memory_budget_mb << 20))
        return merge(*parts, k=self.cfg.keep) if parts else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables, pairs = [], 0
        for delta in pc.unique(batch.column("delta")).to_pylist():
            group = batch.filter(pc.equal(batch.column("delta"), delta))
            order = np.argsort(group.column("row").to_numpy())
            group = group.take(order)
            rows = group.column("row").to_numpy()
            queries = Descriptors(self._vectors(rows), self.ids[rows], self.landmarks[rows])
            found = self._search(queries, None if delta == FULL else self.deltas[delta])
            if delta != FULL:
                old = mining.stored_topk(queries.ids, group.column("old_ids").to_pylist(),
                                         group.column("old_scores").to_pylist(), self.cfg.keep)
                found = old if found is None else merge(old, found, k=self.cfg.keep)
            pairs += found.pairs
            tables.append(mining.negatives_table(found, self.landmarks[rows].tolist(), self.version))
        summary = fragment_summary("hard_negatives", storage.join(self.output, mining.TABLE),
                                   pa.concat_tables(tables), "image_id")
        return pa.Table.from_pylist([dict(summary, pairs=pairs)], schema=MINE_SUMMARY_SCHEMA)


# ---- driver ------------------------------------------------------------------------------------

def _landmarks(cfg: MineConfig, current: pa.Table) -> pa.Table:
    """``current`` with its ``landmark_id`` taken from ``cfg.manifest`` when given (Arrow
    kernels: no Python object per image)."""
    if cfg.manifest is None:
        return current
    manifest = read_manifest(cfg.manifest)
    at = pc.index_in(current.column("image_id"), value_set=manifest.column("image_id").combine_chunks())
    missing = current.column("image_id").filter(pc.is_null(at))
    if len(missing):
        raise MineError(f"manifest {storage.redact(cfg.manifest)}: no landmark for "
                        f"{missing.take(pc.sort_indices(missing)[:5]).to_pylist()} ({len(missing)} images of the features)")
    landmarks = manifest.column("landmark_id").take(at).cast(current.schema.field("landmark_id").type)
    return current.set_column(current.schema.get_field_index("landmark_id"), "landmark_id", landmarks)


def _previous_uris(features_uri: str, versions: set[int]) -> dict[int, pa.Table | None]:
    """``image_id``, ``uri`` of the features at each version; ``None`` where it is not readable."""
    out: dict[int, pa.Table | None] = {}
    for version in versions:
        try:
            out[version] = features.open_features(features_uri, version).read(["image_id", "uri"])
        except TableError as err:
            log.warning("features version %d is gone (%s): its mined rows are redone in full", version, err)
            out[version] = None
    return out


def _queries(plan: mining.Plan, ids: pa.Array, mined: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """The plan's query rows (incremental ones with their stored lists) as a Ray dataset."""
    parts = [pa.table({"image_id": ids.take(plan.full), "row": plan.full, "delta": np.full(len(plan.full), FULL)})]
    for version, (rows, _) in plan.incremental.items():
        wanted = ids.take(rows)
        stored = mined.take(pc.index_in(wanted, value_set=mined.column("image_id").combine_chunks()))
        parts.append(pa.table({"image_id": wanted, "row": rows, "delta": np.full(len(rows), version),
                               "old_ids": stored.column("negative_ids"),
                               "old_scores": stored.column("negative_scores")}))
    table = pa.concat_tables([_conform(p) for p in parts])
    return ray.data.from_arrow([table.slice(s, rows_per_block) for s in range(0, table.num_rows, rows_per_block)])


def _conform(part: pa.Table) -> pa.Table:
    """``part`` with the columns of :data:`QUERY_SCHEMA` (absent ones null)."""
    columns = [part.column(f.name).cast(f.type) if f.name in part.column_names else pa.nulls(part.num_rows, f.type)
               for f in QUERY_SCHEMA]
    return pa.Table.from_arrays(columns, schema=QUERY_SCHEMA)


def _consume(ds: ray.data.Dataset, committer: ShardCommitter, writer: TableWriter) -> int:
    """Commit the summaries as they arrive; a key committed before this run (an updated row) is
    deleted first. Returns the pairs computed (a repeated batch counted once)."""
    handed: set[str] = set()
    pairs = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for summary in batch.to_pylist():
            keys = set(summary["keys"])
            if not keys <= handed:
                writer.delete((writer.committed & keys) - handed, message="re-mined rows")
                pairs += summary["pairs"]
            handed |= keys
            committer.add(summary)
    committer.flush()
    return pairs


def run_mine(cfg: MineConfig) -> MineResult:
    """Mine (or re-mine, or resume) the hard negatives of ``cfg.features``; Ray must be running."""
    if cfg.keep < cfg.k:
        raise MineError(f"keep: {cfg.keep} must be at least k ({cfg.k})")
    started = time.monotonic()
    table = features.open_features(cfg.features)
    current = _landmarks(cfg, table.read(["image_id", "uri", "landmark_id"]))
    ids = current.column("image_id").combine_chunks()
    output = cfg.output or default_output(cfg.store or storage.default_store(), cfg.features, cfg.keep,
                                          cfg.precision)
    settings = mining.mining_settings(table.settings, cfg.keep, cfg.precision, cfg.manifest or "features")
    lease = Lease(output, owner=f"mine {storage.redact(cfg.features)}", ttl_s=cfg.lease_ttl_s).acquire()
    try:
        writer = TableWriter(open_or_create(storage.join(output, mining.TABLE), mining.SCHEMA, "hard_negatives",
                                            "image_id", settings), lease)
        read = {"features": table.version, "hard_negatives": writer.version}
        mined = writer.table.read()
        versions = set(mined.column("mined_from_version").to_pylist()) - {table.version}
        plan = mining.plan_update(current, table.version, mined, _previous_uris(cfg.features, versions))
        log.info("mine %s (version %d) into %s: %d rows done, %d in full, %d incremental, %d removed; "
                 "%d pairs (a full re-mine: %d)", storage.redact(cfg.features), table.version,
                 storage.redact(output), plan.done, len(plan.full), plan.rows - len(plan.full),
                 len(plan.remove), plan.pairs, len(ids) ** 2)
        writer.delete(plan.remove, message="images no longer in the features")
        pairs = 0
        if plan.rows:
            landmarks = pc.fill_null(current.column("landmark_id"), -1).to_numpy().astype(np.int64)
            gallery = put_gallery(table, ids, landmarks, cfg.gallery_block_rows,
                                  {v: delta for v, (_, delta) in plan.incremental.items()})
            ds = _queries(plan, ids, mined, cfg.query_rows).map_batches(
                MineActor, batch_format="pyarrow", batch_size=cfg.query_rows,
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.actor_cpus,
                num_gpus=cfg.actor_gpus or None,
                fn_constructor_kwargs={"cfg": cfg, "gallery": gallery, "output": output, "version": table.version})
            pairs = _consume(ds, ShardCommitter({"hard_negatives": writer}, cfg.shard_size, total=plan.rows), writer)
        writer.collect_garbage()
    finally:
        lease.release()
    at_version = writer.table.read(["mined_from_version"]).column(0).to_numpy()
    missing = len(ids) - int((at_version == table.version).sum())
    if missing:
        raise MineError(f"{missing} image(s) were not mined against features version {table.version}; rerun to resume")
    return MineResult(output, plan.rows, pairs, len(ids) ** 2, time.monotonic() - started, plan, read,
                      {"hard_negatives": writer.version})

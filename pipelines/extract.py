"""Distributed extraction on Ray Data: manifest -> bytes -> decode (tasks) -> model (actor pool)
-> descriptors (+ rerank features) as committed Parquet shards.

Exactly-once: the manifest is cut by row order into shards of ``shard_size`` rows (shard id =
index). Only shards without a commit are processed. Model actors write Parquet parts into the
attempt folder and return small summaries (files and image ids); the driver commits a shard
(:func:`cvnet.storage.commit_shard`) once every one of its images is in a part, either as a
descriptor or as a bad input. A killed actor's batch is retried by Ray Data; parts written by a
dead attempt are never referenced by a commit and are removed at the end. A rerun after a
driver crash skips the committed shards. Every input ends in ``descriptors`` or ``bad_inputs``.
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import ray

from cvnet import features, storage
from cvnet.data.images import ImageDecodeError, decode_image
from cvnet.data.manifest import ImageReadError, read_image_bytes, read_manifest

log = logging.getLogger(__name__)

DEFAULT_SCALES = (0.7071, 1.0, 1.4142)
SUMMARY_SCHEMA = pa.schema([("shard", pa.string()), ("kind", pa.string()), ("file", pa.string()),
                            ("image_ids", pa.list_(pa.string()))])
DECODED_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("landmark_id", pa.int64()),
                            ("shard", pa.string()), ("pixels", pa.large_binary()), ("height", pa.int32()),
                            ("width", pa.int32()), ("stage", pa.string()), ("error", pa.string())])


class ExtractError(RuntimeError):
    """The extraction could not finish (bad manifest, incomplete shards)."""


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract (hashed into the commits) and how to run it (not hashed)."""

    manifest: str
    model: str
    output: str
    rerank_features: bool = False
    scales: tuple[float, ...] = DEFAULT_SCALES
    float16: bool = False
    shard_size: int = 1000
    # execution only
    num_actors: int = 1
    actor_cpus: float = 0.5
    actor_gpus: float = 0.0
    torch_threads: int = 1
    batch_size: int = 8  # images per forward pass (same-size images only)
    part_rows: int = 64  # images per actor call = rows per written Parquet part (at most)
    read_rows: int = 16  # images per decode task

    def identity(self, model_sha256: str) -> dict:
        """The settings that determine the output (a rerun must match them)."""
        return {"manifest": self.manifest, "model_sha256": model_sha256, "scales": list(self.scales),
                "rerank_features": self.rerank_features, "float16": self.float16,
                "shard_size": self.shard_size}


@dataclass
class ExtractResult:
    output: str
    attempt: str
    config_hash: str
    shards: int
    shards_skipped: int
    images: int
    bad_inputs: int
    seconds: float
    commit_uri: str
    stats: str = ""
    committed_now: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def file_sha256(uri: str) -> str:
    """SHA-256 of a file (streamed; local or remote)."""
    fs, path = storage.filesystem(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def shard_id(index: int) -> str:
    return f"shard-{index:05d}"


def split_shards(manifest: pa.Table, shard_size: int) -> dict[str, pa.Table]:
    """Cut the manifest by row order into shards of ``shard_size`` rows."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return {shard_id(i): manifest.slice(start, shard_size)
            for i, start in enumerate(range(0, manifest.num_rows, shard_size))}


def check_unique_ids(manifest: pa.Table, uri: str) -> None:
    ids = manifest.column("image_id").to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = sorted({i for i in ids if i in seen or seen.add(i)})
        raise ExtractError(f"manifest {uri}: duplicate image_id(s) {dup[:5]} ({len(dup)} in all)")


# ---- Ray Data stages ---------------------------------------------------------------------------

def decode_batch(batch: pa.Table) -> pa.Table:
    """Read and decode each row; failures become rows with ``stage`` and ``error`` set."""
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    for row in batch.to_pylist():
        pixels, height, width, stage, error = b"", 0, 0, None, None
        try:
            image = decode_image(read_image_bytes(row["uri"]), row["image_id"])
            pixels, (height, width) = image.tobytes(), image.shape[:2]
        except ImageReadError as err:
            stage, error = "read", err.reason
        except ImageDecodeError as err:
            stage, error = "decode", err.reason
        for key in ("image_id", "uri", "landmark_id", "shard"):
            out[key].append(row[key])
        out["pixels"].append(pixels)
        out["height"].append(height)
        out["width"].append(width)
        out["stage"].append(stage)
        out["error"].append(error)
    return pa.Table.from_pydict(out, schema=DECODED_SCHEMA)


class ExtractActor:
    """Holds one model (loaded once per actor); turns decoded rows into Parquet parts."""

    def __init__(self, config: dict, attempt: str, model_sha256: str):
        import torch

        from cvnet.models.checkpoints import load_model

        self.cfg = ExtractConfig(**config)
        torch.set_num_threads(max(1, self.cfg.torch_threads))
        device = "cuda" if self.cfg.actor_gpus > 0 else "cpu"
        self.model = load_model(self.cfg.model, device=device)
        self.attempt = attempt
        info = {"model_uri": storage.redact(self.cfg.model), "model_sha256": model_sha256,
                "scales": list(self.cfg.scales)}
        self.desc_schema = features.descriptor_schema(self.cfg.float16, info)
        self.rerank_schema = features.rerank_schema(self.cfg.float16, info)

    def _describe(self, images: list[np.ndarray], ids: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Descriptors by id, and model errors by id (a failing batch is retried image by image)."""
        try:
            X = self.model.global_descriptor(images, self.cfg.scales, self.cfg.batch_size)
            return dict(zip(ids, X)), {}
        except (ValueError, RuntimeError):
            done, errors = {}, {}
            for image_id, image in zip(ids, images):
                try:
                    done[image_id] = self.model.global_descriptor([image], self.cfg.scales)[0]
                except (ValueError, RuntimeError) as err:
                    errors[image_id] = f"{type(err).__name__}: {err}"
            return done, errors

    def _rerank_levels(self, images: list[np.ndarray], ids: list[str], by_id: dict[str, np.ndarray],
                       errors: dict[str, str]) -> dict[str, tuple]:
        """Rerank pyramid levels by id when requested; an image whose features fail (e.g. too
        small for the pyramid) moves from ``by_id`` to ``errors``, so it is a bad input, not half
        an output."""
        if not self.cfg.rerank_features:
            return {}
        levels = {}
        for image_id, image in zip(ids, images):
            if image_id not in by_id:
                continue
            try:
                levels[image_id] = self.model.rerank_features(image).levels
            except (ValueError, RuntimeError) as err:
                del by_id[image_id]
                errors[image_id] = f"rerank features: {type(err).__name__}: {err}"
        return levels

    def _write(self, shard: str, kind: str, table: pa.Table, summary: list[dict]) -> None:
        rel = f"{storage.ATTEMPTS_DIR}/{self.attempt}/{shard}/{kind}-{uuid.uuid4().hex[:12]}.parquet"
        features.write_parquet(table, storage.join(self.cfg.output, rel))
        summary.append({"shard": shard, "kind": kind, "file": rel,
                        "image_ids": table.column("image_id").to_pylist()})

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        good = [r for r in rows if r["error"] is None]
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in good]
        ids = [r["image_id"] for r in good]
        by_id, model_errors = self._describe(images, ids)
        levels_by_id = self._rerank_levels(images, ids, by_id, model_errors)
        summary: list[dict] = []
        for shard in sorted({r["shard"] for r in rows}):
            in_shard = [r for r in rows if r["shard"] == shard]
            ok = [(r, im) for r, im in zip(good, images) if r["shard"] == shard and r["image_id"] in by_id]
            bad = [{"image_id": r["image_id"], "uri": r["uri"], "stage": r["stage"], "error": r["error"]}
                   for r in in_shard if r["error"] is not None]
            bad += [{"image_id": r["image_id"], "uri": r["uri"], "stage": "model",
                     "error": model_errors[r["image_id"]]} for r in in_shard if r["image_id"] in model_errors]
            if ok:
                ids = [r["image_id"] for r, _ in ok]
                X = np.stack([by_id[i] for i in ids])
                self._write(shard, "descriptors", features.descriptor_table(
                    ids, [r["landmark_id"] for r, _ in ok], X, self.desc_schema), summary)
                if self.cfg.rerank_features:
                    levels = [levels_by_id[i] for i in ids]
                    self._write(shard, "rerank", features.rerank_table(ids, levels, self.rerank_schema), summary)
            if bad:
                self._write(shard, "bad_inputs", features.bad_inputs_table(bad), summary)
        return pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)


# ---- driver ------------------------------------------------------------------------------------

class _ShardTracker:
    """Collects part summaries per shard and commits a shard once all its images are placed."""

    def __init__(self, output: str, attempt: str, chash: str, expected: dict[str, set[str]],
                 with_rerank: bool):
        self.output, self.attempt, self.chash = output, attempt, chash
        self.expected, self.with_rerank = expected, with_rerank
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.files: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self.rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.committed: list[str] = []  # by this attempt
        self.closed: set[str] = set()  # committed by this or a concurrent attempt

    def add(self, part: dict) -> None:
        shard, kind, ids = part["shard"], part["kind"], part["image_ids"]
        if shard in self.closed:
            raise ExtractError(f"shard {shard}: a {kind} part arrived after the commit; not counted")
        if kind != "rerank":
            again = self.seen[shard].intersection(ids)
            if again:
                raise ExtractError(f"shard {shard}: image(s) {sorted(again)[:5]} arrived twice; not committed")
            self.seen[shard].update(ids)
        self.files[shard][kind].append(part["file"])
        self.rows[shard][kind] += len(ids)
        if self.seen[shard] == self.expected[shard] and self._rerank_complete(shard):
            self._commit(shard)

    def _rerank_complete(self, shard: str) -> bool:
        rows = self.rows[shard]
        return not self.with_rerank or rows.get("rerank", 0) == rows.get("descriptors", 0)

    def _commit(self, shard: str) -> None:
        commit = storage.ShardCommit(shard=shard, attempt=self.attempt, config_hash=self.chash,
                                     files={k: sorted(v) for k, v in self.files[shard].items()},
                                     rows=dict(self.rows[shard]))
        self.closed.add(shard)
        if storage.commit_shard(self.output, commit):
            self.committed.append(shard)
        else:
            log.warning("shard %s was committed by another attempt; keeping that one", shard)

    def pending(self) -> list[str]:
        return sorted(set(self.expected) - self.closed)


def _blocks(shards: dict[str, pa.Table], rows: int) -> list[pa.Table]:
    blocks = []
    for sid, table in shards.items():
        table = table.append_column("shard", pa.array([sid] * table.num_rows, pa.string()))
        blocks += [table.slice(start, rows) for start in range(0, table.num_rows, rows)]
    return blocks


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    """Run (or resume) one extraction; Ray must be initialised. Returns counts and timings."""
    started = time.monotonic()
    manifest = read_manifest(cfg.manifest)
    check_unique_ids(manifest, cfg.manifest)
    model_sha = file_sha256(cfg.model)
    chash = storage.config_hash(cfg.identity(model_sha))
    shards = split_shards(manifest, cfg.shard_size)
    done = storage.committed_shards(cfg.output, chash)
    todo = {sid: table for sid, table in shards.items() if sid not in done}
    attempt = storage.new_attempt_id()
    log.info("extract %s: %d images in %d shards, %d already committed, attempt %s",
             storage.redact(cfg.output), manifest.num_rows, len(shards), len(done), attempt)
    tracker = _ShardTracker(cfg.output, attempt, chash,
                            {sid: set(t.column("image_id").to_pylist()) for sid, t in todo.items()},
                            cfg.rerank_features)
    stats = ""
    if todo:
        ds = ray.data.from_arrow(_blocks(todo, cfg.read_rows))
        ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
        ds = ds.map_batches(
            ExtractActor, batch_format="pyarrow", batch_size=cfg.part_rows,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None,
            fn_constructor_kwargs={"config": asdict(cfg), "attempt": attempt, "model_sha256": model_sha})
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for part in batch.to_pylist():
                tracker.add(part)
        stats = ds.stats()
    missing = tracker.pending()
    if missing:
        raise ExtractError(f"{len(missing)} shard(s) incomplete, not committed: {missing[:5]}; rerun to resume")
    seconds = time.monotonic() - started
    processed = sum(len(todo[s]) for s in tracker.committed)
    all_shards = storage.committed_shards(cfg.output, chash)
    bad = sum(c.rows.get("bad_inputs", 0) for c in all_shards.values())
    commit_uri = storage.commit_job(cfg.output, all_shards, chash, {
        "manifest": storage.redact(cfg.manifest), "model": storage.redact(cfg.model),
        "model_sha256": model_sha, "images": manifest.num_rows, "bad_inputs": bad,
        "rerank_features": cfg.rerank_features, "float16": cfg.float16})
    storage.remove_orphan_attempts(cfg.output, all_shards)
    return ExtractResult(output=cfg.output, attempt=attempt, config_hash=chash, shards=len(shards),
                         shards_skipped=len(done), images=processed, bad_inputs=bad, seconds=seconds,
                         commit_uri=commit_uri, stats=stats, committed_now=tracker.committed)

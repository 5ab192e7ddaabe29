"""Distributed extraction on Ray Data: manifest -> bytes -> decode (tasks) -> model (actor pool)
-> descriptors (+ rerank features) and bad inputs, committed tables (:mod:`cvnet.features`).

The output belongs to the model (its SHA-256) and the settings that change the numbers, not to
a manifest: one table per model grows with every manifest given to it. The work of a run is the
manifest's image ids minus those already committed (as features or as bad inputs), run through
:mod:`pipelines.committed` under the output's lease, so every image ends exactly once in one of
the two tables, whatever dies or meets whatever. Transient failures (I/O errors, throttling,
timeouts, CUDA out-of-memory) are retried and fail the job naming the item when they persist;
only permanent ones (undecodable bytes, a file confirmed absent, an image too small for the
model) become bad inputs.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from cvnet import features, storage
from cvnet.config import ExtractConfig
from cvnet.data.images import ImageDecodeError, crop_query, decode_image
from cvnet.data.manifest import ImageReadError, read_image_bytes, read_manifest
from cvnet.models.checkpoints import extractor_sha256
from cvnet.registry import parse_models_uri, pin_version, resolve_checkpoint
from cvnet.retry import retry_transient
from cvnet.tables import Lease, TableWriter, open_or_create
from pipelines.committed import SUMMARY_SCHEMA, ShardCommitter, fragment_summary, pending, run_committed

log = logging.getLogger(__name__)

DECODED_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("landmark_id", pa.int64()),
                            ("pixels", pa.large_binary()), ("height", pa.int32()), ("width", pa.int32()),
                            ("stage", pa.string()), ("error", pa.string())])


class ExtractError(RuntimeError):
    """The extraction cannot run as asked (bad manifest, changed URIs, too many bad inputs)."""


class TooManyBadInputs(ExtractError):
    """More than ``max_bad_fraction`` of a run's inputs were bad (they are committed anyway)."""

    def __init__(self, message: str, result: ExtractResult):
        super().__init__(message)
        self.result = result


@dataclass
class ExtractResult:
    output: str
    images: int  # processed by this run (features + bad inputs)
    bad_inputs: int  # recorded by this run
    skipped: int  # manifest rows already committed before this run
    seconds: float
    versions_read: dict[str, int] = field(default_factory=dict)
    versions_written: dict[str, int] = field(default_factory=dict)
    bad_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def default_output(store: str, model: str, extractor: str) -> str:
    """``<store>/features/<model file stem, or registered name>-<first 12 hex of its extractor
    hash>`` (:func:`cvnet.models.checkpoints.extractor_sha256`)."""
    if model.startswith("models:/"):
        stem = parse_models_uri(model)[0]
    else:
        stem = model.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0] or "model"
    return storage.join(store, "features", f"{stem}-{extractor[:12]}")


def check_unique_ids(manifest: pa.Table, uri: str) -> None:
    ids = manifest.column("image_id")
    counts = pc.value_counts(ids)
    dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
    if dup:
        raise ExtractError(f"manifest {uri}: duplicate image_id(s) {sorted(dup)[:5]} ({len(dup)} in all)")


def changed_uris(manifest: pa.Table, known: pa.Table) -> pa.Table:
    """Rows of ``known`` (image_id, uri) whose id is in the manifest under another URI."""
    joined = manifest.select(["image_id", "uri"]).join(known, "image_id", right_suffix="_stored")
    return joined.filter(pc.not_equal(joined.column("uri"), joined.column("uri_stored")))


# ---- Ray Data stages ---------------------------------------------------------------------------

def _is_transient(err: BaseException) -> bool:
    return isinstance(err, ImageReadError) and err.transient


def decode_batch(batch: pa.Table, retries: int = 3) -> pa.Table:
    """Read and decode each row (queries cropped to their ``bbx``); permanent failures become
    rows with ``stage`` and ``error`` set, transient ones are retried and then raise."""
    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    for row in batch.to_pylist():
        pixels, height, width, stage, error = b"", 0, 0, None, None
        try:
            data = retry_transient(lambda: read_image_bytes(row["uri"]), f"{row['image_id']} ({row['uri']})",
                                   _is_transient, attempts=retries)
            image = decode_image(data, row["image_id"])
            if row.get("bbx") is not None:
                image = np.ascontiguousarray(crop_query(image, row["bbx"]))
            pixels, (height, width) = image.tobytes(), image.shape[:2]
        except ImageReadError as err:
            stage, error = "read", err.reason
        except ImageDecodeError as err:
            stage, error = "decode", err.reason
        for key in ("image_id", "uri", "landmark_id"):
            out[key].append(row[key])
        out["pixels"].append(pixels)
        out["height"].append(height)
        out["width"].append(width)
        out["stage"].append(stage)
        out["error"].append(error)
    return pa.Table.from_pydict(out, schema=DECODED_SCHEMA)


class ExtractActor:
    """Holds one model (loaded once per actor); writes feature and bad-input fragments."""

    def __init__(self, cfg: ExtractConfig, output: str):
        import torch

        from cvnet.models.checkpoints import load_model

        self.cfg, self.output = cfg, output
        torch.set_num_threads(max(1, cfg.torch_threads))
        self.model = load_model(cfg.model, device="cuda" if cfg.actor_gpus > 0 else "cpu")

    def _features(self, image: np.ndarray) -> tuple:
        levels = self.model.rerank_features(image).levels if self.cfg.rerank_features else None
        return self.model.global_descriptor([image], self.cfg.scales)[0], levels

    def _model_outputs(self, images: list[np.ndarray], ids: list[str]) -> tuple[dict, dict]:
        """Features by id and permanent model errors by id. A ``ValueError`` (an image the model
        cannot take) is the image's own; a ``RuntimeError`` (e.g. CUDA OOM) is retried and raises."""
        def batch() -> dict:
            X = self.model.global_descriptor(images, self.cfg.scales, self.cfg.batch_size)
            levels = [self.model.rerank_features(im).levels for im in images] if self.cfg.rerank_features \
                else [None] * len(images)
            return {i: (x, lv) for i, x, lv in zip(ids, X, levels)}

        transient = lambda err: isinstance(err, RuntimeError)  # noqa: E731
        try:
            return retry_transient(batch, f"model on {ids[:3]}...", transient, self.cfg.transient_retries), {}
        except ValueError:
            done, errors = {}, {}
            for image_id, image in zip(ids, images):
                try:
                    done[image_id] = retry_transient(lambda: self._features(image), image_id, transient,
                                                     self.cfg.transient_retries)
                except ValueError as err:
                    errors[image_id] = f"{type(err).__name__}: {err}"
            return done, errors

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        good = [r for r in rows if r["error"] is None]
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in good]
        done, model_errors = self._model_outputs(images, [r["image_id"] for r in good]) if good else ({}, {})
        ok = [r for r in good if r["image_id"] in done]
        bad = [{"image_id": r["image_id"], "uri": r["uri"], "stage": r["stage"], "error": r["error"]}
               for r in rows if r["error"] is not None]
        bad += [{"image_id": r["image_id"], "uri": r["uri"], "stage": "model", "error": model_errors[r["image_id"]]}
                for r in good if r["image_id"] in model_errors]
        summaries = []
        if ok:
            X = np.stack([done[r["image_id"]][0] for r in ok])
            levels = [done[r["image_id"]][1] for r in ok] if self.cfg.rerank_features else None
            table = features.features_table(ok, X, self.cfg.float16, levels)
            summaries.append(fragment_summary("features", storage.join(self.output, features.FEATURES),
                                              table, "image_id"))
        if bad:
            summaries.append(fragment_summary("bad_inputs", storage.join(self.output, features.BAD_INPUTS),
                                              features.bad_inputs_table(bad), "image_id"))
        return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


# ---- driver ------------------------------------------------------------------------------------

def _open_tables(cfg: ExtractConfig, output: str, model_sha: str, lease: Lease) -> dict[str, TableWriter]:
    settings = features.extraction_settings(model_sha, cfg.scales, cfg.float16, cfg.rerank_features)
    schemas = {"features": (features.FEATURES, features.features_schema(cfg.float16, cfg.rerank_features)),
               "bad_inputs": (features.BAD_INPUTS, features.BAD_INPUTS_SCHEMA)}
    return {name: TableWriter(open_or_create(storage.join(output, path), schema, name, "image_id", settings), lease)
            for name, (path, schema) in schemas.items()}


def _prepare(cfg: ExtractConfig, manifest: pa.Table, writers: dict[str, TableWriter]) -> None:
    """Refuse (or, with ``refresh_changed``, forget) known ids whose URI changed; forget the
    manifest's recorded bad inputs with ``retry_bad_inputs``: forgotten ids are work to do."""
    known = pa.concat_tables([w.table.read(["image_id", "uri"]) for w in writers.values()])
    changed = changed_uris(manifest, known)
    if changed.num_rows and not cfg.refresh_changed:
        shown = ", ".join(f"{r['image_id']}: {r['uri_stored']} -> {r['uri']}" for r in changed.to_pylist()[:5])
        raise ExtractError(f"{changed.num_rows} image id(s) already extracted from another URI ({shown}); "
                           "rerun with --refresh-changed to re-extract them")
    forget = set(changed.column("image_id").to_pylist())
    if cfg.retry_bad_inputs:
        forget |= writers["bad_inputs"].committed & set(manifest.column("image_id").to_pylist())
    for name, writer in writers.items():
        writer.delete(forget, message=f"{name}: re-extract changed URIs / retried bad inputs")


def _pipeline(cfg: ExtractConfig, todo: pa.Table, output: str) -> ray.data.Dataset:
    blocks = [todo.slice(start, cfg.read_rows) for start in range(0, todo.num_rows, cfg.read_rows)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                        fn_kwargs={"retries": cfg.transient_retries})
    return ds.map_batches(ExtractActor, batch_format="pyarrow", batch_size=cfg.part_rows,
                          compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                          num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None,
                          fn_constructor_kwargs={"cfg": cfg, "output": output})


def _bad_reasons(writer: TableWriter, keys: list[str]) -> dict[str, int]:
    if not keys:
        return {}
    rows = writer.table.take(keys, ["stage", "error"]).to_pylist()
    return dict(Counter(f"{r['stage']}: {r['error']}" for r in rows).most_common())


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    """Run (or resume) one extraction into the model's table; Ray must be initialised."""
    started = time.monotonic()
    manifest = read_manifest(cfg.manifest)
    check_unique_ids(manifest, cfg.manifest)
    cfg = cfg.model_copy(update={"model": pin_version(cfg.model)})  # every actor loads one version
    model_sha = extractor_sha256(resolve_checkpoint(cfg.model))
    output = cfg.output or default_output(cfg.store or storage.default_store(), cfg.model, model_sha)
    lease = Lease(output, owner=f"extract {storage.redact(cfg.manifest)}", ttl_s=cfg.lease_ttl_s).acquire()
    try:
        writers = _open_tables(cfg, output, model_sha, lease)
        read = {name: w.version for name, w in writers.items()}
        _prepare(cfg, manifest, writers)
        done = writers["features"].committed | writers["bad_inputs"].committed
        todo = pending(manifest, "image_id", done)
        log.info("extract into %s: %d images in the manifest, %d already committed, %d to do",
                 storage.redact(output), manifest.num_rows, manifest.num_rows - todo.num_rows, todo.num_rows)
        committer = ShardCommitter(writers, cfg.shard_size, total=todo.num_rows)
        if todo.num_rows:
            run_committed(_pipeline(cfg, todo, output), committer)
        for writer in writers.values():
            writer.collect_garbage()
    finally:
        lease.release()
    result = ExtractResult(
        output=output, images=sum(len(k) for k in committer.keys.values()),
        bad_inputs=len(committer.keys["bad_inputs"]),
        skipped=manifest.num_rows - todo.num_rows, seconds=time.monotonic() - started, versions_read=read,
        versions_written={name: w.version for name, w in writers.items()},
        bad_reasons=_bad_reasons(writers["bad_inputs"], committer.keys["bad_inputs"]))
    missing = todo.num_rows - result.images
    if missing:
        raise ExtractError(f"{missing} image(s) were neither extracted nor recorded as bad; rerun to resume")
    if result.images and result.bad_inputs > cfg.max_bad_fraction * result.images:
        top = "; ".join(f"{n} x {reason}" for reason, n in list(result.bad_reasons.items())[:5])
        raise TooManyBadInputs(f"{result.bad_inputs} of the {result.images} inputs of this run are bad (more than "
                               f"max_bad_fraction={cfg.max_bad_fraction}); committed anyway; top reasons: {top}",
                               result)
    return result

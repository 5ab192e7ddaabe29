"""The training skeleton both stages run on Ray Train (V2): DDP workers (gloo on CPU, nccl on
GPU), checkpoints in the store (a local folder or S3), resume after a lost worker
(``FailureConfig.max_failures``) or a crashed driver (rerun with the same run name: Ray Train
finds the last checkpoint under the same ``storage_path`` + ``name``).

A stage gives the skeleton its worker function and, inside it, its state (anything with
``step``, ``state_dict()`` and ``load_state_dict()``) and its per-step batch function; the
skeleton does the rest:

- :func:`start_worker` (rank, world size, device, torch threads, quiet per-report logs);
- :func:`resume`: the state's modules move to the device *before* the checkpoint loads, so the
  optimizer state lands on the parameters' device (:func:`load_on_device`);
- :func:`batches`: the prefetching loader (:func:`cvnet.training.data.prefetch_batches`), each
  batch a pure function of ``(seed, step)``, so a resumed run continues the same order;
- :class:`TrainRun`: progress lines, MLflow metrics on rank 0 (in the run the driver created),
  the bad-inputs list and ``ray.train.report`` with a checkpoint every ``every_steps`` steps;
- :func:`fit`: the driver side (``TorchTrainer`` with the store as ``storage_path``).

Nothing private of Ray is imported. All ranks report at the same steps (``report`` is a
barrier); sampling is a function of the step, so every rank runs the same number of steps.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from cvnet import storage
from cvnet.training.data import prefetch_batches

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrainState(Protocol):
    """What the skeleton needs of a stage's state."""

    step: int

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class CheckpointFiles:
    """A stage's checkpoint folder: the torch state and a small JSON read without it."""

    state: str
    meta: str


@dataclass(frozen=True)
class Worker:
    """This DDP worker: its rank, the world size, its device and the loop config."""

    rank: int
    world: int
    device: torch.device
    cfg: dict[str, Any]


@dataclass
class FitResult:
    """Where the final checkpoint is and its meta JSON."""

    checkpoint_path: str
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def resumed_from(self) -> list[int]:
        return list(self.meta.get("resumed_from", []))


def start_worker(cfg: dict[str, Any]) -> Worker:
    """This worker's context; sets torch's threads to the CPUs reserved for it."""
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg["scaling"]["cpus_per_worker"])))
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), cfg)


def _quiet_report_log() -> None:
    """Keep Ray Train's INFO line per ``report`` (the whole metrics dict, every rank) off the
    console: Ray 2.x logs it under a logger named by its source file, outside ``ray.train``,
    where ``LoggingConfig(log_level)`` does not reach (found by name; nothing imported)."""
    for name in list(logging.root.manager.loggerDict):
        if "ray/train" in name.replace(os.sep, "/"):
            logging.getLogger(name).setLevel(logging.WARNING)


def load_on_device(state: TrainState, modules: Iterable[nn.Module], payload: dict[str, Any] | None,
                   device: torch.device | str) -> None:
    """Move ``modules`` to ``device``, then load ``payload`` (a ``state_dict()``) into
    ``state``: the optimizer casts its state to its parameters' device, so the order matters."""
    for module in modules:
        module.to(device)
    if payload is not None:
        state.load_state_dict(payload)


def resume(state: TrainState, modules: Iterable[nn.Module], worker: Worker,
           files: CheckpointFiles) -> bool:
    """Put ``modules`` on the worker's device and load the run's last checkpoint, if any;
    True when the run resumed."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    payload = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            payload = torch.load(os.path.join(folder, files.state), map_location="cpu",
                                 weights_only=True)
    load_on_device(state, modules, payload, worker.device)
    if checkpoint:
        log.info("rank %d resumes at step %d", worker.rank, state.step)
    return checkpoint is not None


def batches(make_batch: Callable[[int], T], start_step: int, stop_step: int,
            loader: dict[str, Any]) -> Iterator[T]:
    """The batches of ``[start_step, stop_step)`` through the prefetching loader (``loader``:
    the config's ``loader`` section; ``workers: 0`` makes them synchronously)."""
    return prefetch_batches(make_batch, start_step, stop_step, loader["workers"],
                            loader["prefetch_factor"], loader["context"])


def mlflow_on_rank0(worker: Worker, fresh: bool):
    """The ``mlflow`` module with the driver's run active, on rank 0 only (None elsewhere);
    a fresh (not resumed) run gets the config as params."""
    cfg = worker.cfg
    if worker.rank != 0 or not cfg.get("_mlflow_run_id"):
        return None
    import mlflow

    from cvnet.tracking import flatten_params

    mlflow.set_tracking_uri(cfg["_tracking_uri"])
    if mlflow.active_run() is None:
        mlflow.start_run(run_id=cfg["_mlflow_run_id"])
    if fresh:
        mlflow.log_params(flatten_params({k: v for k, v in cfg.items() if not k.startswith("_")}))
    return mlflow


@dataclass
class TrainRun:
    """The per-step bookkeeping of a worker: progress lines and MLflow metrics every
    ``log_every`` steps (rank 0), the bad inputs, and a report with a checkpoint (``state``'s
    ``state_dict()`` and a meta JSON: step, ``resumed_from``, ``meta``) every
    ``checkpoint.every_steps`` steps and at the end."""

    worker: Worker
    files: CheckpointFiles
    state: TrainState
    meta: dict[str, Any]
    tag: str
    unit: str
    fresh: bool
    bad_inputs: dict[int, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mlflow = mlflow_on_rank0(self.worker, self.fresh)
        self._seen, self._tic = 0, time.perf_counter()

    def step_done(self, count: int, metrics: dict[str, float],
                  bad_inputs: dict[int, dict[str, str]]) -> None:
        """Account for the step just done (``state.step``) over ``count`` items on all workers."""
        cfg, rank, step = self.worker.cfg, self.worker.rank, self.state.step
        max_steps = cfg["optim"]["max_steps"]
        self.bad_inputs.update(bad_inputs)
        self._seen += count
        last = step == max_steps
        if rank == 0 and (step % cfg["log_every"] == 0 or last):
            metrics[f"{self.unit}_per_s"] = self._seen / (time.perf_counter() - self._tic)
            self._seen, self._tic = 0, time.perf_counter()
            # the logger, not print: Ray Train tees a worker's print to the console twice
            log.info("[%s] step %d/%d %s", self.tag, step, max_steps,
                     " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if self.mlflow:
                self.mlflow.log_metrics(metrics, step=step)
        if step % cfg["checkpoint"]["every_steps"] == 0 or last:
            self._report(step, metrics)

    def _report(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        folder = tempfile.mkdtemp(prefix=f"cvnet-{self.tag}-") if self.worker.rank == 0 else None
        try:  # SYNC upload: the store has its copy once report returns
            if folder:
                torch.save(self.state.state_dict(), os.path.join(folder, self.files.state))
                meta = {"step": step, "resumed_from": list(getattr(self.state, "resumed_from", [])),
                        **self.meta}
                with open(os.path.join(folder, self.files.meta), "w") as f:
                    json.dump(meta, f)
            ray.train.report({"step": step, **metrics},
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
                             checkpoint_dir_name=f"step_{step:08d}")
            if folder:
                log.info("[%s] checkpoint step_%08d saved in %s", self.tag, step,
                         storage.redact(self.worker.cfg["_run_dir"]))
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def finish(self) -> None:
        """Gather every worker's bad inputs; rank 0 writes them as JSON to the run dir."""
        rows = list(self.bad_inputs.values())
        if self.worker.world > 1:
            parts: list[Any] = [None] * self.worker.world
            torch.distributed.all_gather_object(parts, rows)
            rows = [row for part in parts for row in part]
        if self.worker.rank == 0 and rows:
            unique = {row["image_id"]: row for row in rows}
            run_dir = self.worker.cfg["_run_dir"]
            fs, path = storage.filesystem(storage.join(run_dir, "bad_inputs.json"))
            fs.pipe_file(path, json.dumps(list(unique.values()), indent=1).encode())
            log.warning("%d bad training images listed in %s", len(unique), storage.redact(run_dir))


def _storage(root: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train: s3fs wrapped for pyarrow remotely."""
    fs, path = storage.filesystem(root)
    if not storage.is_remote(root):
        os.makedirs(path, exist_ok=True)
        return path, None
    import pyarrow.fs

    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def checkpoints_root(cfg: dict[str, Any]) -> str:
    """``<store>/checkpoints``: where every run's checkpoints live (``<root>/<name>/step_N``)."""
    return storage.join(cfg.get("store") or storage.default_store(), "checkpoints")


def fit(train_loop_per_worker: Callable[[dict[str, Any]], None], cfg: dict[str, Any],
        files: CheckpointFiles, mlflow_run_id: str | None = None,
        tracking_uri: str | None = None) -> FitResult:
    """Run (or resume, same ``cfg["name"]``) ``train_loop_per_worker`` on Ray Train DDP workers.

    ``cfg`` is the stage's config as a dict (``name``, ``store``, ``scaling``, ``checkpoint``);
    the workers get it with ``_run_dir``, ``_mlflow_run_id`` and ``_tracking_uri`` added.
    Raises ``ray.train.TrainingFailedError`` when the workers fail more than
    ``checkpoint.max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import init_ray, worker_env

    root = checkpoints_root(cfg)
    init_ray()
    storage_path, storage_fs = _storage(root)
    loop_cfg = dict(cfg, _run_dir=storage.join(root, cfg["name"]), _mlflow_run_id=mlflow_run_id,
                    _tracking_uri=tracking_uri)
    scaling, ck = cfg["scaling"], cfg["checkpoint"]
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling["num_workers"], use_gpu=scaling["use_gpu"],
            resources_per_worker={"CPU": scaling["cpus_per_worker"],
                                  **({"GPU": 1} if scaling["use_gpu"] else {})}),
        run_config=ray.train.RunConfig(
            name=cfg["name"], storage_path=storage_path, storage_filesystem=storage_fs,
            worker_runtime_env={"env_vars": worker_env()},
            # Ray Train's per-report INFO lines stay in its log files, off the console
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ck["num_to_keep"]),
            failure_config=ray.train.FailureConfig(
                max_failures=ck["max_failures"],
                controller_failure_limit=ck["controller_failure_limit"])))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg['name']}: finished without a checkpoint")
    path = storage.join(root, cfg["name"], os.path.basename(result.checkpoint.path))
    return FitResult(path, read_meta(path, files))


def read_meta(checkpoint_path: str, files: CheckpointFiles) -> dict[str, Any]:
    """The small JSON beside a checkpoint's state (read without fetching the state)."""
    fs, folder = storage.filesystem(checkpoint_path)
    return json.loads(fs.cat_file(storage.join(folder, files.meta)))


def read_state(checkpoint_path: str, files: CheckpointFiles) -> dict[str, Any]:
    """A checkpoint's torch state (any URI), on the CPU."""
    fs, folder = storage.filesystem(checkpoint_path)
    with fs.open(storage.join(folder, files.state), "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


NAME_TAG = "cvnet.train_name"
TRAINED_TAG = "cvnet.trained"  # on a registered version: "<MLflow run id>/<step>"


def find_training_run(mlflow: Any, experiment: str, name: str) -> str | None:
    """The id of an earlier MLflow run of the training run ``name`` (tagged ``NAME_TAG``), so a
    rerun after a driver crash appends to it."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow.search_runs([found.experiment_id], filter_string=f"tags.`{NAME_TAG}` = '{name}'",
                              output_format="list", max_results=1)
    return runs[0].info.run_id if runs else None


def publish_model(save: Callable[[str], None], model_uri: str, kind: str) -> Any:
    """Export a trained model once: ``save(local_path)`` writes it, then it goes to the store at
    ``model_uri`` and, as an MLflow model of ``kind`` (``global`` / ``rerank``, the checkpoint
    inside, :func:`cvnet.pyfunc.log_cvnet_model`), to the active MLflow run; returns its
    ``ModelInfo`` (``model_uri`` is what the registry takes)."""
    from cvnet.pyfunc import log_cvnet_model

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(model_uri))
        save(local)
        with open(local, "rb") as f:
            storage.put_atomic(model_uri, f.read())
        return log_cvnet_model(local, kind)


@dataclass
class TrainOutcome:
    """What a training job produced: its MLflow run, the exported model and its evaluation."""

    run_id: str
    tracking_uri: str
    model_uri: str  # <store>/models/<name>/cvnet_<kind>.pth
    checkpoint_path: str
    step: int
    resumed_from: list[int]
    model: Any  # the trained network (eval mode)
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None  # the registered version, when registered

    def summary(self) -> str:
        """What a job prints: the step, the model, the run, the version, the metrics."""
        lines = [f"trained to step {self.step} (resumed from {self.resumed_from or 'none'}); model "
                 f"{storage.redact(self.model_uri)}; MLflow run {self.run_id} at {storage.redact(self.tracking_uri)}"
                 + (f"; registered version {self.model_version}" if self.model_version else "")]
        return "\n".join(lines + [f"{key} = {value:.2f}" for key, value in self.metrics.items()])


def train_and_publish(cfg: Any, kind: str, fit: Callable[..., FitResult], load: Callable[[str], Any],
                      export: Callable[[Any, str, dict[str, Any]], None],
                      evaluate: Callable[[Any], dict[str, float]], loop_cfg: dict[str, Any] | None = None,
                      params: dict[str, str] | None = None) -> TrainOutcome:
    """The driver of a training job (both stages): find or create the MLflow run of ``cfg.name``,
    log ``params`` once, ``fit`` (or resume) on ``loop_cfg`` (default ``cfg`` as a dict), ``load``
    the result, ``export`` it to ``<store>/models/<name>/cvnet_<kind>.pth`` and as an MLflow model,
    ``evaluate`` it when ``cfg.eval.benchmark`` is set (metrics logged) and register it as
    ``cfg.register_as`` with those metrics."""
    import mlflow

    from cvnet.registry import find_version, register_model, version_metrics
    from cvnet.tracking import mlflow_run, resolve_tracking_uri

    store = cfg.store or storage.default_store()
    tracking_uri = resolve_tracking_uri(store, cfg.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    run_id = find_training_run(mlflow, cfg.experiment, cfg.name)
    with mlflow_run(cfg.experiment, tracking_uri, run_name=cfg.name, run_id=run_id,
                    tags={NAME_TAG: cfg.name}) as run:
        run_id = run.info.run_id
        logged_params = mlflow.get_run(run_id).data.params
        mlflow.log_params({k: v for k, v in (params or {}).items() if k not in logged_params})
        result = fit(loop_cfg or cfg.model_dump(), run_id, tracking_uri)
        model = load(result.checkpoint_path)
        model_uri = storage.join(store, "models", cfg.name, f"cvnet_{kind}.pth")
        attempt = f"{run_id}/{result.step}"  # a rerun of a finished run registers nothing new
        version = find_version(cfg.register_as, TRAINED_TAG, attempt) if cfg.register_as else None
        if version is not None:
            metrics = {k: v for k, v in version_metrics(cfg.register_as, version).items() if k != "step"}
        else:
            metadata = {"step": result.step, "train_name": cfg.name}
            logged = publish_model(lambda path: export(model, path, metadata), model_uri, kind)
            metrics = evaluate(model) if cfg.eval.benchmark else {}
            if metrics:
                mlflow.log_metrics(metrics, step=result.step)
            if cfg.register_as:
                version = register_model(cfg.register_as, logged.model_uri,
                                         tags={TRAINED_TAG: attempt, "step": result.step, **metrics})
    log.info("run %s: step %d, model %s, MLflow run %s at %s", cfg.name, result.step,
             storage.redact(model_uri), run_id, storage.redact(tracking_uri))
    return TrainOutcome(run_id, tracking_uri, model_uri, result.checkpoint_path, result.step,
                        result.resumed_from, model, metrics, version)

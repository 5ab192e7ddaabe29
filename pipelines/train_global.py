"""Stage-1 training on Ray Train (V2): DDP workers (gloo on CPU, nccl on GPU), checkpoints of
model + optimizer + scheduler + queue + step in the store, resume after a lost worker
(``FailureConfig.max_failures``) or a crashed driver (rerun with the same run name).

The MLflow run is created by the caller; its id arrives in the config and rank 0 appends to it.
All ranks call ``ray.train.report`` at the same steps (it is a barrier); sampling is a pure
function of the step, so every rank runs the same number of steps.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cvnet import storage
from cvnet.models.checkpoints import submodule_state
from cvnet.training.data import BatchLoader, global_batch, load_train_set, worker_indices
from cvnet.training.steps import (Stage1State, build_global_net, build_stage1, center_head,
                                  set_train_mode, train_step)

log = logging.getLogger(__name__)

STATE_FILE = "stage1_state.pt"
META_FILE = "stage1_meta.json"


@dataclass
class Stage1Result:
    """Where the final checkpoint is and what it holds."""

    checkpoint_path: str
    step: int
    resumed_from: list[int]


def _save(state: Stage1State, landmark_ids: np.ndarray) -> str:
    folder = tempfile.mkdtemp(prefix="cvnet-stage1-")
    torch.save(state.state_dict(), os.path.join(folder, STATE_FILE))
    meta = {"step": state.step, "depth": state.core.net.depth, "resumed_from": state.resumed_from,
            "landmark_ids": [int(x) for x in landmark_ids]}
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump(meta, f)
    return folder


def _quiet_report_log() -> None:
    """Keep Ray Train's INFO line per ``report`` (the whole metrics dict, every rank) off the
    console: Ray 2.60 logs it under a logger named by its source file, outside ``ray.train``,
    where ``LoggingConfig(log_level)`` does not reach."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker function (plain torch inside, Ray only for context and reports)."""
    import ray.train
    import ray.train.torch

    from cvnet.data.manifest import read_image_bytes

    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg["scaling"]["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    data, optim, loss_cfg = cfg["data"], cfg["optim"], cfg["loss"]
    train_set = load_train_set(data["root"], data["split"])
    net = build_global_net(cfg["model"]["depth"], cfg["model"]["init_seed"],
                           cfg["model"]["backbone_init"])
    state, frozen = build_stage1(net, train_set.num_classes, loss_cfg, optim,
                                 cfg["model"]["freeze_stages"])
    for module in (state.momentum, state.queue, state.con_loss):
        module.to(device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state.load_state_dict(torch.load(os.path.join(folder, STATE_FILE),
                                             map_location="cpu", weights_only=True))
        log.info("rank %d resumes at step %d", rank, state.step)
    loader = BatchLoader(train_set, data["image_size"], tuple(data["crop_scale"]), data["flip"],
                         read_image_bytes)
    state.model.to(device)
    set_train_mode(state.model, frozen)
    if cfg["model"]["center_head"] and not checkpoint:  # same batch on every rank
        first = global_batch(train_set, 0, optim["batch_size"] * world, cfg["seed"],
                             data["sampling"])
        queries, _, _ = loader.load(first, np.random.default_rng([cfg["seed"], 2**31]))
        center_head(state.core.net, queries.to(device))
        state.momentum.encoder.load_state_dict(state.core.net.state_dict())
    state.model = ray.train.torch.prepare_model(state.model)  # keeps train/eval modes
    state.momentum.follow_modes(state.core.net)
    mlflow = _mlflow_on_rank0(cfg, rank, fresh=state.step == 0)
    every, max_steps = cfg["checkpoint"]["every_steps"], optim["max_steps"]
    seen, tic = 0, time.perf_counter()
    metrics: dict[str, float] = {}
    while state.step < max_steps:
        step = state.step
        indices = worker_indices(train_set, step, optim["batch_size"], rank, world, cfg["seed"],
                                 data["sampling"])
        queries, keys, labels = loader.load(indices, np.random.default_rng([cfg["seed"], step, rank]))
        metrics = train_step(state, queries.to(device), keys.to(device), labels.to(device),
                             loss_cfg["lambda_cls"], loss_cfg["lambda_con"], cfg["scaling"]["bf16"],
                             optim["clip_grad_norm"])
        seen += len(indices) * world
        if rank == 0 and (state.step % cfg["log_every"] == 0 or state.step == max_steps):
            metrics["images_per_s"] = seen / (time.perf_counter() - tic)
            seen, tic = 0, time.perf_counter()
            # the logger, not print: Ray Train tees a worker's print to the console twice
            log.info("[train-global] step %d/%d loss %.3f (cls %.3f, con %.3f) lr %.4f "
                     "%.1f images/s", state.step, max_steps, metrics["loss"],
                     metrics["loss_cls"], metrics["loss_con"], metrics["lr"],
                     metrics["images_per_s"])
            if mlflow:
                mlflow.log_metrics(metrics, step=state.step)
        if state.step % every == 0 or state.step == max_steps:
            folder = _save(state, train_set.landmark_ids) if rank == 0 else None
            try:  # SYNC upload: the store has its copy once report returns
                ray.train.report(
                    {"step": state.step, **metrics},
                    checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
                    checkpoint_dir_name=f"step_{state.step:08d}")
                if folder:
                    log.info("[train-global] checkpoint step_%08d saved in %s", state.step,
                             storage.redact(cfg["_run_dir"]))
            finally:
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
    _write_bad_inputs(cfg, loader, rank, world)


def _mlflow_on_rank0(cfg: dict[str, Any], rank: int, fresh: bool):
    """The ``mlflow`` module with the driver's run active, on rank 0 only (None elsewhere);
    a fresh (not resumed) run gets the config as params."""
    if rank != 0 or not cfg.get("_mlflow_run_id"):
        return None
    import mlflow

    from cvnet.tracking import flatten_params

    mlflow.set_tracking_uri(cfg["_tracking_uri"])
    if mlflow.active_run() is None:
        mlflow.start_run(run_id=cfg["_mlflow_run_id"])
    if fresh:
        mlflow.log_params(flatten_params({k: v for k, v in cfg.items() if not k.startswith("_")}))
    return mlflow


def _write_bad_inputs(cfg: dict[str, Any], loader: BatchLoader, rank: int, world: int) -> None:
    """Gather every worker's bad training images; rank 0 writes them as JSON to the run dir."""
    rows = list(loader.bad_inputs.values())
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    if rank == 0 and rows:
        unique = {row["image_id"]: row for row in rows}
        fs, path = storage.filesystem(storage.join(cfg["_run_dir"], "bad_inputs.json"))
        fs.pipe_file(path, json.dumps(list(unique.values()), indent=1).encode())
        log.warning("%d bad training images listed in %s", len(unique), cfg["_run_dir"])


def _storage(root: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train: s3fs wrapped for pyarrow remotely."""
    fs, path = storage.filesystem(root)
    if not storage.is_remote(root):
        os.makedirs(path, exist_ok=True)
        return path, None
    import pyarrow.fs

    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def fit_stage1(cfg: dict[str, Any], mlflow_run_id: str | None = None,
               tracking_uri: str | None = None) -> Stage1Result:
    """Run (or resume, same ``cfg["name"]``) stage-1 training; ``cfg`` is the config as a dict.

    Checkpoints go to ``<store>/checkpoints/<name>/``. Raises ``ray.train.TrainingFailedError``
    when the workers fail more than ``checkpoint.max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import init_ray, worker_env

    store = cfg.get("store") or storage.default_store()
    root = storage.join(store, "checkpoints")
    load_train_set(cfg["data"]["root"], cfg["data"]["split"])  # fail fast on bad data
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
    meta = _read_meta(path)
    return Stage1Result(path, meta["step"], meta["resumed_from"])


def _read_meta(checkpoint_path: str) -> dict[str, Any]:
    """The small JSON beside a stage-1 checkpoint's state (read without fetching the state)."""
    fs, folder = storage.filesystem(checkpoint_path)
    return json.loads(fs.cat_file(storage.join(folder, META_FILE)))


def load_trained_net(checkpoint_path: str) -> torch.nn.Module:
    """The trained global network (eval mode) from a stage-1 checkpoint folder (any URI)."""
    meta = _read_meta(checkpoint_path)
    fs, folder = storage.filesystem(checkpoint_path)
    with fs.open(storage.join(folder, STATE_FILE), "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    net = build_global_net(meta["depth"], 0)
    net.load_state_dict(submodule_state(state["model"], "net."))
    return net.eval()

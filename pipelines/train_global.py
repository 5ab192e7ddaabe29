"""Stage-1 training (CVNet-Global) on the training skeleton (:mod:`pipelines.training`):
checkpoints of model + optimizer + scheduler + momentum encoder + queue + step in the store,
resume after a lost worker or a crashed driver (rerun with the same run name), batches made
ahead by the prefetching loader.

The MLflow run is created by the caller; its id arrives in the config and rank 0 appends to it.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from cvnet.models.checkpoints import submodule_state
from cvnet.training.data import BatchLoader, Stage1Batches, global_batch, load_train_set
from cvnet.training.steps import (Stage1State, build_global_net, build_stage1, center_head,
                                  set_train_mode, train_step)
from pipelines import training
from pipelines.training import CheckpointFiles, FitResult, TrainOutcome

log = logging.getLogger(__name__)

FILES = CheckpointFiles("stage1_state.pt", "stage1_meta.json")


def _center_head(state: Stage1State, loader: BatchLoader, worker: training.Worker) -> None:
    """Centre the descriptors on the first global batch (the same batch on every rank)."""
    cfg = worker.cfg
    first = global_batch(loader.train_set, 0, cfg["optim"]["batch_size"] * worker.world,
                         cfg["seed"], cfg["data"]["sampling"])
    queries, _, _ = loader.load(first, np.random.default_rng([cfg["seed"], 2**31]))
    center_head(state.core.net, queries.to(worker.device))
    state.momentum.encoder.load_state_dict(state.core.net.state_dict())


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker function (plain torch inside, Ray only through the skeleton)."""
    import ray.train.torch

    from cvnet.data.manifest import read_image_bytes

    worker = training.start_worker(cfg)
    data, optim, loss, model = cfg["data"], cfg["optim"], cfg["loss"], cfg["model"]
    train_set = load_train_set(data["root"], data["split"])
    net = build_global_net(model["depth"], model["init_seed"], model["backbone_init"])
    state, frozen = build_stage1(net, train_set.num_classes, loss, optim, model["freeze_stages"])
    resumed = training.resume(state, [state.model, state.momentum, state.queue, state.con_loss],
                              worker, FILES)
    set_train_mode(state.model, frozen)
    loader = BatchLoader(train_set, data["image_size"], tuple(data["crop_scale"]), data["flip"],
                         read_image_bytes, data["perspective"])
    if model["center_head"] and not resumed:
        _center_head(state, loader, worker)
    state.model = ray.train.torch.prepare_model(state.model)  # keeps train/eval modes
    state.momentum.follow_modes(state.core.net)
    make_batch = Stage1Batches(loader, optim["batch_size"], worker.rank, worker.world, cfg["seed"],
                               data["sampling"])
    meta = {"depth": model["depth"], "landmark_ids": [int(x) for x in train_set.landmark_ids]}
    run = training.TrainRun(worker, FILES, state, meta, "train-global", "images", fresh=not resumed)
    device = worker.device
    for batch in training.batches(make_batch, state.step, optim["max_steps"], cfg["loader"]):
        metrics = train_step(state, batch.queries.to(device), batch.keys.to(device),
                             batch.labels.to(device), loss["lambda_cls"], loss["lambda_con"],
                             cfg["scaling"]["bf16"], optim["clip_grad_norm"])
        run.step_done(len(batch.labels) * worker.world, metrics, batch.bad_inputs)
    run.finish()


def fit_stage1(cfg: dict[str, Any], mlflow_run_id: str | None = None,
               tracking_uri: str | None = None) -> FitResult:
    """Run (or resume, same ``cfg["name"]``) stage-1 training; ``cfg`` is the config as a dict.

    Checkpoints go to ``<store>/checkpoints/<name>/``. Raises ``ray.train.TrainingFailedError``
    when the workers fail more than ``checkpoint.max_failures`` times.
    """
    load_train_set(cfg["data"]["root"], cfg["data"]["split"])  # fail fast on bad data
    return training.fit(train_loop_per_worker, cfg, FILES, mlflow_run_id, tracking_uri)


def load_trained_net(checkpoint_path: str) -> torch.nn.Module:
    """The trained global network (eval mode) from a stage-1 checkpoint folder (any URI)."""
    meta = training.read_meta(checkpoint_path, FILES)
    net = build_global_net(meta["depth"], 0)
    net.load_state_dict(submodule_state(training.read_state(checkpoint_path, FILES)["model"], "net."))
    return net.eval()


def export_global(net: torch.nn.Module, uri: str, metadata: dict[str, Any]) -> None:
    """Save a global network as a CVNet checkpoint (its re-ranker at the default init)."""
    from cvnet.models.checkpoints import save_checkpoint
    from cvnet.models.cvnet import CVNet

    model = CVNet(net.depth)
    model.encoder_q.load_state_dict(net.state_dict())
    save_checkpoint(model, uri, {"stage": "global", "rerank": "untrained", **metadata})


def train_global(cfg: Any) -> TrainOutcome:
    """``cvnet train-global``: train (or resume) per ``cfg`` (a TrainGlobalConfig), export to
    ``<store>/models/<name>/cvnet_global.pth``, evaluate on ``cfg.eval.benchmark`` (global
    mAP), register as ``cfg.register_as``."""
    from cvnet.retrieval import evaluate_global, flat_metrics

    return training.train_and_publish(
        cfg, "global", fit_stage1, load_trained_net, export_global,
        lambda net: flat_metrics({"global": evaluate_global(net, cfg.eval.benchmark, cfg.eval.scales)}))

"""Stage-2 training (CVNet-Rerank) on the training skeleton (:mod:`pipelines.training`).

The backbone is frozen; the stage-3 maps are computed from it (eval mode, no grad) for the
images of each step's pairs, on the fly or, with ``map_cache.views`` > 0, once per fixed view and
worker (:class:`~cvnet.training.rerank_data.MapCache`). Only the model's ``conv2ds`` + ``cv_learner`` train, through
:class:`~cvnet.training.rerank_step.PairScorer` (the module DDP wraps). Pairs: anchors with one
positive and negatives from a hard-negatives table (the curriculum's share) or at random; Hide-and-
Seek hides cells of the maps with the curriculum's probability; ``positives.self_share`` of the
positives are another view of the anchor image. Checkpoints hold the re-ranker's
state, the optimizer, the schedule, the step and a digest of each step's pairs and images
(``sample_digests``), so a resumed run can be checked to have continued the same order.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cvnet.models.cvnet import CVNet
from cvnet.training.curriculum import Curriculum, Schedule
from cvnet.training.data import BatchLoader, TrainSet, load_train_set
from cvnet.training.pairs import PairSampler
from cvnet.training.rerank_data import MapCache, RerankBatches, RerankImages, pair_maps
from cvnet.training.rerank_step import MapBatch, PairScorer, freeze_backbone, rerank_step
from cvnet.training.steps import warmup_cosine
from pipelines import training
from pipelines.training import CheckpointFiles, FitResult, TrainOutcome

log = logging.getLogger(__name__)

FILES = CheckpointFiles("stage2_state.pt", "stage2_meta.json")


@dataclass
class RerankState:
    """Everything a stage-2 step changes; ``scorer`` may be the DDP wrapper."""

    scorer: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    resumed_from: list[int] = field(default_factory=list)
    sample_digests: list[int] = field(default_factory=list)

    @property
    def core(self) -> PairScorer:
        return getattr(self.scorer, "module", self.scorer)

    def state_dict(self) -> dict[str, Any]:
        return {"scorer": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "resumed_from": list(self.resumed_from),
                "sample_digests": torch.tensor(self.sample_digests, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; records the step it resumes from."""
        missing = {"scorer", "optimizer", "scheduler", "step"} - set(state)
        if missing:
            raise KeyError(f"stage-2 checkpoint: missing {sorted(missing)}")
        self.core.load_state_dict(state["scorer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.resumed_from = [*state.get("resumed_from", []), self.step]
        self.sample_digests = [int(x) for x in state.get("sample_digests", torch.zeros(0)).tolist()]


def initial_model(model: dict[str, Any]) -> CVNet:
    """The starting CVNet: the checkpoint ``model["init"]`` (a released CVNet or a stage-1
    export, whose re-ranker is at its default init) or a seeded random init; its
    ``rerank_scale`` is ``model["rerank_scale"]`` when set, else the checkpoint's."""
    from cvnet.models.checkpoints import load_model

    if model["init"]:
        net = load_model(model["init"])
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model["init_seed"])
            net = CVNet(model["depth"]).eval()
    if model.get("rerank_scale"):
        net.rerank_scale = float(model["rerank_scale"])
    return net


def build_rerank(model: CVNet, optim: dict[str, Any], precision: str = "fp32") -> RerankState:
    """A fresh :class:`RerankState` training ``model``'s re-ranker (``optim``: the config section)."""
    scorer = PairScorer.of(model, precision).train()
    params = [p for p in scorer.parameters() if p.requires_grad]
    if optim["name"] == "sgd":
        optimizer = torch.optim.SGD(params, lr=optim["lr"], momentum=optim["momentum"],
                                    weight_decay=optim["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(params, lr=optim["lr"], weight_decay=optim["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(optim["warmup_steps"], optim["max_steps"]))
    return RerankState(scorer, optimizer, scheduler)


def sample_digest(batch: RerankImages) -> int:
    """A checksum of a batch's pairs and augmented images (equal batches, equal digests)."""
    digest = zlib.crc32(batch.pairs.anchors.tobytes() + batch.pairs.keys.tobytes())
    return zlib.crc32(batch.images.numpy().tobytes(), digest)


def train_step(state: RerankState, maps: MapBatch, batch: RerankImages,
               clip_grad_norm: float | None = None) -> dict[str, float]:
    """One stage-2 step on ``maps`` (the maps of ``batch``, hidden or not): the re-ranker's
    loss, backward, optimizer and schedule steps; the step's sample digest is recorded."""
    lr = state.optimizer.param_groups[0]["lr"]
    metrics = rerank_step(state.scorer, state.optimizer, maps, clip_grad_norm)
    state.scheduler.step()
    state.step += 1
    state.sample_digests.append(sample_digest(batch))
    negatives = batch.pairs.labels == 0
    return {**metrics, "lr": lr, "has_prob": batch.has_prob,
            "hard_share": float(batch.pairs.hard[negatives].mean()) if negatives.any() else 0.0}


def curriculum(cfg: dict[str, Any]) -> Curriculum:
    """The config's curriculum section as a :class:`Curriculum`."""
    return Curriculum(*(Schedule(**cfg["curriculum"][key], name=f"curriculum.{key}")
                        for key in ("hard_share", "has_prob")))


def pair_sampler(cfg: dict[str, Any], train_set: TrainSet) -> PairSampler:
    """The pair sampler over ``train_set``; hard negatives from the pinned table version."""
    from cvnet.tables import read_table

    neg = cfg["negatives"]
    table = None
    if neg["table"]:
        table = read_table(neg["table"], ["image_id", "landmark_id", "negative_ids"], neg["version"])
    return PairSampler(train_set, table, neg["per_anchor"], neg["top_k"], cfg["data"]["sampling"],
                       cfg["seed"], cfg["positives"]["self_share"])


def hide_and_seek_args(cfg: dict[str, Any]) -> dict[str, Any]:
    has = cfg["hide_and_seek"]
    grid = None if has["cell_size"] else has["grid"]
    return {"cell_size": has["cell_size"], "grid": grid, "fill": has["fill"]}


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The Ray Train worker function (plain torch inside, Ray only through the skeleton)."""
    import ray.train.torch

    from cvnet.data.manifest import read_image_bytes

    worker = training.start_worker(cfg)
    data, optim, model_cfg = cfg["data"], cfg["optim"], cfg["model"]
    train_set = load_train_set(data["root"], data["split"])
    model = initial_model(model_cfg)
    backbone = freeze_backbone(model)
    state = build_rerank(model, optim, model_cfg["precision"])
    resumed = training.resume(state, [backbone, state.scorer], worker, FILES)
    state.scorer = ray.train.torch.prepare_model(state.scorer)
    loader = BatchLoader(train_set, data["image_size"], tuple(data["crop_scale"]), data["flip"],
                         read_image_bytes, data["perspective"])
    make_batch = RerankBatches(pair_sampler(cfg, train_set), loader, curriculum(cfg),
                               optim["batch_size"], worker.rank, worker.world, cfg["seed"],
                               cfg["map_cache"]["views"])
    cache = MapCache() if cfg["map_cache"]["views"] else None
    meta = {key: model_cfg[key] for key in ("init", "init_seed", "depth", "rerank_scale")}
    run = training.TrainRun(worker, FILES, state, meta, "train-rerank", "pairs", fresh=not resumed)
    has = hide_and_seek_args(cfg)
    for batch in training.batches(make_batch, state.step, optim["max_steps"], cfg["loader"]):
        maps = pair_maps(backbone, batch, worker.device, model_cfg["maps_precision"], cache)
        maps = maps.hidden(batch.has_prob, [cfg["seed"], batch.step, worker.rank], **has)
        metrics = train_step(state, maps, batch, optim["clip_grad_norm"])
        run.step_done(len(batch.pairs.keys) * worker.world, metrics, batch.bad_inputs)
    run.finish()


def pin_negatives(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with the hard-negatives table's version fixed (the latest when unset), so every
    worker and every restart reads the same rows."""
    from cvnet.tables import Table

    neg = cfg["negatives"]
    if not neg["table"] or neg["version"] is not None:
        return cfg
    return {**cfg, "negatives": {**neg, "version": Table.open(neg["table"]).version}}


def fit_stage2(cfg: dict[str, Any], mlflow_run_id: str | None = None,
               tracking_uri: str | None = None) -> FitResult:
    """Run (or resume, same ``cfg["name"]``) stage-2 training; ``cfg`` is the config as a dict
    with the negatives' version pinned (:func:`pin_negatives`).

    Checkpoints go to ``<store>/checkpoints/<name>/``.
    """
    load_train_set(cfg["data"]["root"], cfg["data"]["split"])  # fail fast on bad data
    return training.fit(train_loop_per_worker, cfg, FILES, mlflow_run_id, tracking_uri)


def load_trained_model(checkpoint_path: str) -> CVNet:
    """The CVNet (eval mode) of a stage-2 checkpoint: its initial model with the trained
    re-ranker."""
    meta = training.read_meta(checkpoint_path, FILES)
    model = initial_model(meta)
    PairScorer.of(model).load_state_dict(training.read_state(checkpoint_path, FILES)["scorer"])
    return model.eval()


def export_rerank(model: CVNet, uri: str, metadata: dict[str, Any]) -> None:
    """Save a CVNet with a trained re-ranker as a CVNet checkpoint."""
    from cvnet.models.checkpoints import save_checkpoint

    save_checkpoint(model, uri, {"stage": "rerank", **metadata})


def input_params(cfg: dict[str, Any]) -> dict[str, str]:
    """The inputs of a run (training data, hard-negatives table and its version, initial model)
    as MLflow params."""
    neg = cfg["negatives"]
    params = {"input.train": cfg["data"]["root"], "input.model_init": str(cfg["model"]["init"])}
    if neg["table"]:
        params |= {"input.hard_negatives": neg["table"], "input.hard_negatives.version": str(neg["version"])}
    return params


def train_rerank(cfg: Any) -> TrainOutcome:
    """``cvnet train-rerank``: train (or resume) per ``cfg`` (a TrainRerankConfig) with the
    hard negatives' version pinned, export to ``<store>/models/<name>/cvnet_rerank.pth``,
    evaluate on ``cfg.eval.benchmark`` (global and re-ranked, both shortlist rules), register as
    ``cfg.register_as``."""
    from cvnet.retrieval import evaluate_rerank, flat_metrics

    loop_cfg = pin_negatives(cfg.model_dump())
    return training.train_and_publish(
        cfg, "rerank", fit_stage2, load_trained_model,
        lambda model, uri, meta: export_rerank(model, uri, {**meta, "init": cfg.model.init}),
        lambda model: flat_metrics(evaluate_rerank(model, cfg.eval.benchmark, cfg.eval.k, cfg.eval.scales)),
        loop_cfg, input_params(loop_cfg))

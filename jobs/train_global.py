"""``cvnet train-global``: stage-1 training (CVNet-Global) on Ray Train DDP workers.

One MLflow run per training run (found again by run name, so a rerun after a driver crash
appends to it); at the end the trained network is saved as a CVNet checkpoint in
``<store>/models/<name>/``, evaluated on ``eval.benchmark`` when one is given, logged and
registered as ``cvnet-global``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from jobs.cli import entrypoint

HELP = "train the global descriptor (stage 1) with DDP; --config FILE [--flags] [key=value ...]"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.config import TrainGlobalConfig, add_config_arguments

    add_config_arguments(parser, TrainGlobalConfig)


@dataclass
class TrainOutcome:
    """What a training run produced."""

    run_id: str
    tracking_uri: str
    model_uri: str
    checkpoint_path: str
    step: int
    resumed_from: list[int]
    net: Any  # the trained global network (eval mode)
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None


def export_model(net: Any, uri: str, metadata: dict[str, Any]) -> None:
    """Save the trained global network as a CVNet checkpoint (rerank part at its default init)."""
    from cvnet.models.checkpoints import save_checkpoint
    from cvnet.models.cvnet import CVNet

    model = CVNet(net.depth)
    model.encoder_q.load_state_dict(net.state_dict())
    save_checkpoint(model, uri, {"stage": "global", "rerank": "untrained", **metadata})


def eval_metrics(prefix: str, results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat MLflow metrics (mAP x100) from revisitop results."""
    return {f"{prefix}_{p}_map": 100 * results[p]["map"] for p in ("easy", "medium", "hard")}


def train(cfg: Any) -> TrainOutcome:
    """Train (or resume) per ``cfg`` (a TrainGlobalConfig), export, evaluate, register."""
    import mlflow

    from cvnet import storage
    from cvnet.registry import register_model
    from cvnet.retrieval import evaluate_global
    from cvnet.tracking import mlflow_run, resolve_tracking_uri
    from pipelines.train_global import fit_stage1, load_trained_net
    from pipelines.training import NAME_TAG, find_training_run, publish_model

    store = cfg.store or storage.default_store()
    tracking_uri = resolve_tracking_uri(store, cfg.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    run_id = find_training_run(mlflow, cfg.experiment, cfg.name)
    with mlflow_run(cfg.experiment, tracking_uri, run_name=cfg.name, run_id=run_id,
                    tags={NAME_TAG: cfg.name}) as run:
        run_id = run.info.run_id
        result = fit_stage1(cfg.model_dump(), run_id, tracking_uri)
        net = load_trained_net(result.checkpoint_path)
        model_uri = storage.join(store, "models", cfg.name, "cvnet_global.pth")
        logged = publish_model(lambda path: export_model(net, path, {"step": result.step,
                                                                     "train_name": cfg.name}),
                               model_uri, "global")
        metrics: dict[str, float] = {}
        if cfg.eval.benchmark:
            metrics = eval_metrics("eval", evaluate_global(net, cfg.eval.benchmark, cfg.eval.scales))
            mlflow.log_metrics(metrics, step=result.step)
        version = None
        if cfg.register_as:
            version = register_model(cfg.register_as, logged.model_uri,
                                     tags={"step": result.step, **metrics})
    log.info("run %s: step %d, model %s, MLflow run %s at %s", cfg.name, result.step,
             storage.redact(model_uri), run_id, storage.redact(tracking_uri))
    return TrainOutcome(run_id, tracking_uri, model_uri, result.checkpoint_path, result.step,
                        result.resumed_from, net, metrics, version)


def run(args: argparse.Namespace) -> int:
    from jobs.config import TrainGlobalConfig, config_from_args

    outcome = train(config_from_args(TrainGlobalConfig, args))
    print(f"trained to step {outcome.step} (resumed from {outcome.resumed_from or 'none'}); "
          f"model {outcome.model_uri}; MLflow run {outcome.run_id} at {outcome.tracking_uri}"
          + (f"; registered version {outcome.model_version}" if outcome.model_version else ""))
    for key, value in outcome.metrics.items():
        print(f"{key} = {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

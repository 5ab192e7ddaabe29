"""``cvnet train-rerank``: stage-2 training (CVNet-Rerank) on Ray Train DDP workers.

Starts from ``model.init`` (a released CVNet checkpoint or a stage-1 export), keeps the backbone
frozen and trains the re-ranker on (anchor, positive / negative) pairs with hard negatives from
``negatives.table`` (its version pinned and logged), Hide-and-Seek and a curriculum. One MLflow
run per training run (found again by run name, so a rerun appends to it); at the end the model
is saved as a CVNet checkpoint ``<store>/models/<name>/cvnet_rerank.pth``, evaluated with
re-ranking on ``eval.benchmark`` when one is given, logged and registered as ``cvnet-rerank``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.cli import entrypoint

HELP = "train the re-ranker (stage 2) with DDP; --config FILE [--flags] [key=value ...]"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.config import TrainRerankConfig
    from jobs.config import add_config_arguments

    add_config_arguments(parser, TrainRerankConfig)


@dataclass
class RerankOutcome:
    """What a stage-2 run produced."""

    run_id: str
    tracking_uri: str
    model_uri: str
    checkpoint_path: str
    step: int
    resumed_from: list[int]
    model: Any  # the trained CVNet (eval mode)
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None


def input_params(cfg: dict[str, Any]) -> dict[str, str]:
    """The inputs of a run (training data, hard-negatives table and its version, initial model)
    as MLflow params."""
    neg = cfg["negatives"]
    params = {"input.train": cfg["data"]["root"], "input.model_init": str(cfg["model"]["init"])}
    if neg["table"]:
        params |= {"input.hard_negatives": neg["table"],
                   "input.hard_negatives.version": str(neg["version"])}
    return params


def evaluate_rerank(model: Any, root: str, k: int = 100, scales: Sequence[float] = (1.0,),
                    rules: Sequence[str] = ("topk", "gt-aware")) -> dict[str, dict[str, Any]]:
    """revisitop results (fractions) of ``model`` on the benchmark at ``root``, in process:
    ``global`` retrieval and its top-``k`` re-ranked and fused (``cvnet.retrieval``) under each
    shortlist rule (``rerank_topk``: the raw top-k; ``rerank_gt-aware``: each protocol's junk
    removed first, scored with that protocol)."""
    from cvnet import storage
    from cvnet.data.revisitop import PROTOCOLS, load_ground_truth, load_image, load_query_image
    from cvnet.eval.revisitop import benchmark_name
    from cvnet.models.global_net import multiscale_descriptors
    from cvnet.retrieval import evaluate_rankings, global_search, protocol_junk, retrieve
    from cvnet.search import Descriptors

    gt = load_ground_truth(storage.join(root, f"gnd_{benchmark_name(root)}.pkl"))
    queries, names = list(gt["qimlist"]), list(gt["imlist"])
    query_images = [load_query_image(root, gt, i) for i in range(len(queries))]
    images = [load_image(root, n) for n in names]
    ranking = global_search(Descriptors(multiscale_descriptors(model.encoder_q, query_images, scales), queries),
                            Descriptors(multiscale_descriptors(model.encoder_q, images, scales), names),
                            len(names))
    query_features = {q: model.rerank_features(image) for q, image in zip(queries, query_images)}
    gallery_features = {n: model.rerank_features(image) for n, image in zip(names, images)}
    score = lambda query, keys: model.match_probability(query, keys)  # noqa: E731
    results = {"global": evaluate_rankings(retrieve(ranking, k, None), gt, queries)}
    if "topk" in rules:
        results["rerank_topk"] = evaluate_rankings(
            retrieve(ranking, k, score, query_features, gallery_features), gt, queries)
    if "gt-aware" in rules:
        results["rerank_gt-aware"] = {p: evaluate_rankings(
            retrieve(ranking, k, score, query_features, gallery_features, junk=protocol_junk(gt, p)),
            gt, queries, protocols=[p])[p] for p in PROTOCOLS}
    return results


def rerank_metrics(model: Any, cfg: Any) -> dict[str, float]:
    """Global and re-ranked mAP (x100) on ``cfg.eval.benchmark``, both shortlist rules."""
    results = evaluate_rerank(model, cfg.eval.benchmark, cfg.eval.k, cfg.eval.scales)
    return {f"eval_{method.replace('-', '_')}_{p}_map": 100 * res[p]["map"]
            for method, res in results.items() for p in ("easy", "medium", "hard")}


def train(cfg: Any) -> RerankOutcome:
    """Train (or resume) per ``cfg`` (a TrainRerankConfig), export, evaluate, register."""
    import mlflow

    from cvnet import storage
    from cvnet.models.checkpoints import save_checkpoint
    from cvnet.registry import register_model
    from cvnet.tracking import mlflow_run, resolve_tracking_uri
    from pipelines.train_rerank import fit_stage2, load_trained_model, pin_negatives
    from pipelines.training import NAME_TAG, find_training_run, publish_model

    store = cfg.store or storage.default_store()
    tracking_uri = resolve_tracking_uri(store, cfg.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    run_id = find_training_run(mlflow, cfg.experiment, cfg.name)
    loop_cfg = pin_negatives(cfg.model_dump())
    with mlflow_run(cfg.experiment, tracking_uri, run_name=cfg.name, run_id=run_id,
                    tags={NAME_TAG: cfg.name}) as run:
        run_id = run.info.run_id
        if not mlflow.get_run(run_id).data.params.get("input.train"):
            mlflow.log_params(input_params(loop_cfg))
        result = fit_stage2(loop_cfg, run_id, tracking_uri)
        model = load_trained_model(result.checkpoint_path)
        model_uri = storage.join(store, "models", cfg.name, "cvnet_rerank.pth")
        logged = publish_model(lambda path: save_checkpoint(model, path, {
            "stage": "rerank", "step": result.step, "train_name": cfg.name,
            "init": cfg.model.init}), model_uri, "rerank")
        metrics = rerank_metrics(model, cfg) if cfg.eval.benchmark else {}
        if metrics:
            mlflow.log_metrics(metrics, step=result.step)
        version = None
        if cfg.register_as:
            version = register_model(cfg.register_as, logged.model_uri,
                                     tags={"step": result.step, **metrics})
    log.info("run %s: step %d, model %s, MLflow run %s at %s", cfg.name, result.step,
             storage.redact(model_uri), run_id, storage.redact(tracking_uri))
    return RerankOutcome(run_id, tracking_uri, model_uri, result.checkpoint_path, result.step,
                         result.resumed_from, model, metrics, version)


def run(args: argparse.Namespace) -> int:
    from cvnet.config import TrainRerankConfig
    from jobs.config import config_from_args

    outcome = train(config_from_args(TrainRerankConfig, args))
    print(f"trained to step {outcome.step} (resumed from {outcome.resumed_from or 'none'}); "
          f"model {outcome.model_uri}; MLflow run {outcome.run_id} at {outcome.tracking_uri}"
          + (f"; registered version {outcome.model_version}" if outcome.model_version else ""))
    for key, value in outcome.metrics.items():
        print(f"{key} = {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

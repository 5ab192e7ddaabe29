"""The scheduled refresh: new images -> extract -> re-mine -> stage 2 -> evaluate -> register -> gate.

One refresh of a store at a time: :func:`run_refresh` holds a :class:`cvnet.tables.Lease` on
``<store>/refresh/`` (a second one raises :class:`~cvnet.tables.LeaseHeld`, naming the holder and
since when). A refresh has an id; ``<store>/refresh/open.json`` names the refresh under way and
``<store>/refresh/<id>/state.json`` (written with :func:`cvnet.storage.put_atomic` after each step)
the versions it pinned (``models:/NAME/VERSION`` of the champion global model and re-ranker) and
what each finished step produced (table URIs and versions, checkpoint, registered version). A
refresh killed in any step resumes that step when rerun: extraction, mining and training resume
by themselves (committed tables, checkpoints under the run name ``refresh-<id>``); the candidate is
found in the registry by its tag ``cvnet.refresh_id`` before registering, so nothing is doubled.

With no refresh under way, a refresh first checks for new work without starting Ray: every
manifest image committed in the champion's features table (as features or bad input) and every
mined row mined from the features' latest version means nothing to do.

MLflow: one parent run ``refresh-<id>`` with a child run per step, each found again by its name
tag on a rerun; the table versions read and written are the child runs' params.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow.compute as pc
from pydantic import BaseModel, ValidationError

from cvnet import features, mining, storage
from cvnet.config import (ConfigError, EvaluateConfig, ExtractConfig, MineConfig, RefreshConfig,
                          TrainRerankConfig)
from cvnet.data.manifest import read_manifest
from cvnet.data.revisitop import ground_truth_uri
from cvnet.models.checkpoints import extractor_sha256
from cvnet.registry import find_version, gate, pin_version, register_model, resolve_checkpoint
from cvnet.tables import Lease, NotCommitted, Table

log = logging.getLogger(__name__)

STEPS = ("extract", "mine", "train", "evaluate", "register", "gate")
REFRESH_TAG = "cvnet.refresh_id"
OPEN = "open.json"
# keys of each step's config that the refresh sets itself
OWNED = {"extract": {"manifest", "model", "store", "address", "tracking_uri", "experiment"},
         "mine": {"features", "store", "address", "tracking_uri", "experiment"},
         "train": {"name", "store", "tracking_uri", "experiment", "register_as"},
         "evaluate": {"benchmark", "model", "rerank", "store", "address", "tracking_uri", "experiment"}}
SECTIONS = {"extract": ExtractConfig, "mine": MineConfig, "train": TrainRerankConfig, "evaluate": EvaluateConfig}


@dataclass
class RefreshState:
    """What a refresh pinned and what its finished steps produced (``<store>/refresh/<id>/state.json``)."""

    id: str
    started_at: str
    pinned: dict[str, str]  # "global" / "rerank": models:/NAME/VERSION
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: bool = False


@dataclass
class RefreshResult:
    """The outcome of one call: ``state`` is None when there was nothing to do."""

    message: str
    state: RefreshState | None = None
    resumed: list[str] = field(default_factory=list)  # steps found done at the start of this call


def refresh_root(store: str) -> str:
    return storage.join(store, "refresh")


def _read_json(uri: str) -> dict[str, Any] | None:
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def _state_uri(store: str, refresh_id: str) -> str:
    return storage.join(refresh_root(store), refresh_id, "state.json")


def _save(store: str, state: RefreshState) -> None:
    storage.put_atomic(_state_uri(store, state.id), json.dumps(asdict(state), indent=1).encode())


def step_config(cfg: RefreshConfig, step: str, **owned: Any) -> BaseModel:
    """The config of ``step``: the refresh's section for it plus the keys the refresh sets
    (placeholders when only checking); errors name ``<step>.<key>``."""
    section = dict(getattr(cfg, step))
    taken = sorted(OWNED[step] & set(section))
    if taken:
        raise ConfigError(f"{step}.{taken[0]}: set by the refresh, not configurable")
    if step == "train":  # nested sections: merge the owned values into them
        for key in ("model", "negatives"):
            section[key] = {**section.get(key, {}), **owned.pop(key, {})}
    try:
        return SECTIONS[step].model_validate({**section, **owned})
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{step}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def check_config(cfg: RefreshConfig) -> None:
    """Every step's section valid (before any work)."""
    placeholders = {"extract": {"manifest": "-", "model": "-"}, "mine": {"features": "-"},
                    "train": {}, "evaluate": {"benchmark": "-", "model": "-"}}
    for step in SECTIONS:
        step_config(cfg, step, **placeholders[step])
    if not cfg.train.get("data", {}).get("root"):
        raise ConfigError("train.data.root: the stage-2 training set is required")


def features_output(cfg: RefreshConfig, store: str, global_model: str) -> str:
    """The champion global model's features table (one per model, grown by each refresh)."""
    from pipelines.extract import default_output

    return cfg.extract.get("output") or default_output(
        store, global_model, extractor_sha256(resolve_checkpoint(global_model)))


def mining_output(cfg: RefreshConfig, store: str, features_uri: str) -> str:
    from pipelines.mine import default_output

    mine = step_config(cfg, "mine", features=features_uri)
    return mine.output or default_output(store, features_uri, mine.keep, mine.precision)


def new_work(cfg: RefreshConfig, store: str, global_model: str) -> str | None:
    """Why there is work to do (one line), or None: every manifest image committed in the
    features table and every mined row mined from the features' latest version."""
    output = features_output(cfg, store, global_model)
    try:
        table = features.open_features(output)
    except NotCommitted:
        return f"no features table yet at {storage.redact(output)}"
    done = set(table.keys().to_pylist())
    try:
        done |= set(Table.open(storage.join(output, features.BAD_INPUTS)).keys().to_pylist())
    except NotCommitted:
        pass
    for manifest in cfg.manifests:
        new = len(set(read_manifest(manifest).column("image_id").to_pylist()) - done)
        if new:
            return f"{new} new image(s) in {storage.redact(manifest)}"
    try:
        mined = Table.open(storage.join(mining_output(cfg, store, output), mining.TABLE))
    except NotCommitted:
        return "no hard negatives mined yet"
    stale = pc.sum(pc.not_equal(mined.read(["mined_from_version"]).column(0), table.version)).as_py() or 0
    if stale or mined.num_rows() != table.num_rows():
        return f"hard negatives not mined from features version {table.version}"
    return None


# ---- MLflow -------------------------------------------------------------------------------------

def _run(client: Any, experiment_id: str, name: str, parent: str | None = None) -> str:
    """The id of the run tagged ``name`` (created, under ``parent``, when absent)."""
    from pipelines.training import NAME_TAG

    found = client.search_runs([experiment_id], filter_string=f"tags.`{NAME_TAG}` = '{name}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {NAME_TAG: name, "mlflow.runName": name} | ({"mlflow.parentRunId": parent} if parent else {})
    return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id


def _log_params_once(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Params not logged yet (a rerun of a step logs only what the killed one had not)."""
    have = client.get_run(run_id).data.params
    for key, value in params.items():
        if key not in have:
            client.log_param(run_id, key, storage.redact(str(value)))


def _versions(result: Any) -> dict[str, int]:
    return ({f"{n}_version_read": v for n, v in result.versions_read.items()}
            | {f"{n}_version_written": v for n, v in result.versions_written.items()})


# ---- the steps ----------------------------------------------------------------------------------

def _extract(cfg: RefreshConfig, state: RefreshState, store: str) -> dict[str, Any]:
    from pipelines.extract import run_extract

    output = features_output(cfg, store, state.pinned["global"])
    params: dict[str, Any] = {"features": output}
    for i, manifest in enumerate(cfg.manifests):
        result = run_extract(step_config(cfg, "extract", manifest=manifest, model=state.pinned["global"],
                                         store=store, output=output))
        log.info("refresh %s: extracted %d new image(s) of %s", state.id, result.images, storage.redact(manifest))
        params |= {f"manifest_{i}": manifest, f"manifest_{i}_images": result.images,
                   **{f"manifest_{i}_{k}": v for k, v in _versions(result).items()}}
    params["features_version"] = features.open_features(output).version
    return params


def _mine(cfg: RefreshConfig, state: RefreshState, store: str) -> dict[str, Any]:
    from pipelines.mine import run_mine

    result = run_mine(step_config(cfg, "mine", features=state.steps["extract"]["features"], store=store))
    log.info("refresh %s: re-mined %d row(s)", state.id, result.rows)
    return {"hard_negatives": storage.join(result.output, mining.TABLE), "rows": result.rows,
            "hard_negatives_version": result.versions_written["hard_negatives"], **_versions(result)}


def _train(cfg: RefreshConfig, state: RefreshState, store: str, run_id: str, tracking_uri: str) -> dict[str, Any]:
    from pipelines.train_rerank import export_rerank, fit_stage2, load_trained_model

    mined = state.steps["mine"]
    train = step_config(cfg, "train", name=f"refresh-{state.id}", store=store, tracking_uri=tracking_uri,
                        register_as=None, model={"init": state.pinned["rerank"]},
                        negatives={"table": mined["hard_negatives"], "version": mined["hard_negatives_version"]})
    result = fit_stage2(train.model_dump(), run_id, tracking_uri)
    model_uri = storage.join(store, "models", f"refresh-{state.id}", "cvnet_rerank.pth")
    export_rerank(load_trained_model(result.checkpoint_path), model_uri,
                  {"step": result.step, "refresh_id": state.id, "init": state.pinned["rerank"]})
    return {"checkpoint": model_uri, "step": result.step, "resumed_from": result.resumed_from,
            "input.hard_negatives": mined["hard_negatives"],
            "input.hard_negatives.version": mined["hard_negatives_version"], "input.model_init": state.pinned["rerank"]}


def _evaluate(cfg: RefreshConfig, state: RefreshState, store: str) -> dict[str, Any]:
    """Candidate and champion on the same benchmark (its ground truth's hash pinned in the state)."""
    from cvnet.retrieval import flat_metrics
    from pipelines.evaluate import run_evaluate

    gnd = ground_truth_uri(cfg.benchmark)
    out: dict[str, Any] = {"benchmark": cfg.benchmark, "benchmark_gnd_sha256": storage.file_sha256(gnd)}
    for who, model in (("candidate", state.steps["train"]["checkpoint"]), ("champion", state.pinned["rerank"])):
        result = run_evaluate(step_config(cfg, "evaluate", benchmark=cfg.benchmark, model=model, rerank=True,
                                          store=store))
        out[f"{who}_metrics"] = flat_metrics(result.metrics)
        out |= {f"{who}_{k}": v for k, v in _versions(result).items()}
    return out


def _register(cfg: RefreshConfig, state: RefreshState, client: Any) -> dict[str, Any]:
    import mlflow

    from cvnet.pyfunc import log_cvnet_model

    version = find_version(cfg.register_as, REFRESH_TAG, state.id, client)
    if version is None:
        logged = log_cvnet_model(state.steps["train"]["checkpoint"], "rerank")
        tags = {REFRESH_TAG: state.id, "step": state.steps["train"]["step"],
                **state.steps["evaluate"]["candidate_metrics"]}
        version = register_model(cfg.register_as, logged.model_uri, tags=tags)
        mlflow.set_tag("registered_version", version)
    return {"version": version}


def _gate(cfg: RefreshConfig, state: RefreshState, client: Any) -> dict[str, Any]:
    evaluated = state.steps["evaluate"]
    decision = gate(cfg.register_as, state.steps["register"]["version"], evaluated["candidate_metrics"],
                    cfg.promote.metric, cfg.promote.min_gain, champion_metrics=evaluated["champion_metrics"],
                    client=client)
    return {"promoted": decision.promote, "reason": decision.reason}


# ---- the refresh --------------------------------------------------------------------------------

def _open_state(cfg: RefreshConfig, store: str) -> RefreshState | None:
    """The refresh under way (to resume), or a new one, or None with nothing to do."""
    pointer = _read_json(storage.join(refresh_root(store), OPEN))
    if pointer is not None:
        found = _read_json(_state_uri(store, pointer["id"]))
        if found is not None and not found["done"]:
            return RefreshState(**found)
    global_model = pin_version(cfg.global_model)
    why = new_work(cfg, store, global_model)
    if why is None:
        return None
    now = datetime.now(timezone.utc)
    state = RefreshState(f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}", now.isoformat(timespec="seconds"),
                         {"global": global_model, "rerank": pin_version(cfg.rerank_model)})
    log.info("refresh %s: %s; pinned %s", state.id, why, state.pinned)
    _save(store, state)
    storage.put_atomic(storage.join(refresh_root(store), OPEN), json.dumps({"id": state.id}).encode())
    return state


def run_refresh(cfg: RefreshConfig, tracking_uri: str) -> RefreshResult:
    """Run, resume, or (nothing new) skip one refresh of ``cfg.store``; Ray is started only when
    there is work (:func:`pipelines.ray_runtime.init_ray`)."""
    from mlflow.tracking import MlflowClient

    check_config(cfg)
    store = cfg.store or storage.default_store()
    started = time.monotonic()
    with Lease(refresh_root(store), owner="cvnet refresh", ttl_s=cfg.lease_ttl_s):
        state = _open_state(cfg, store)
        if state is None:
            return RefreshResult(f"nothing new to do: every manifest image is extracted and the hard negatives "
                                 f"are mined from the latest features ({time.monotonic() - started:.1f} s)")
        resumed = [s for s in STEPS if s in state.steps]
        if resumed:
            log.info("refresh %s: resuming after %s", state.id, ", ".join(resumed))
        import mlflow

        from pipelines.ray_runtime import init_ray

        mlflow.set_tracking_uri(tracking_uri)
        init_ray(cfg.address)
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
        mlflow.set_experiment(experiment_id=experiment_id)
        parent = _run(client, experiment_id, f"refresh-{state.id}")
        _log_params_once(client, parent, {"refresh_id": state.id, "benchmark": cfg.benchmark,
                                          **{f"pinned.{k}": v for k, v in state.pinned.items()},
                                          **{f"manifest_{i}": m for i, m in enumerate(cfg.manifests)}})
        for step in STEPS:
            if step in state.steps:
                continue
            child = _run(client, experiment_id, f"refresh-{state.id}/{step}", parent)
            with mlflow.start_run(run_id=child):
                if step == "extract":
                    produced = _extract(cfg, state, store)
                elif step == "mine":
                    produced = _mine(cfg, state, store)
                elif step == "train":
                    produced = _train(cfg, state, store, child, tracking_uri)
                elif step == "evaluate":
                    produced = _evaluate(cfg, state, store)
                    mlflow.log_metrics(produced["candidate_metrics"]
                                       | {f"champion_{k}": v for k, v in produced["champion_metrics"].items()})
                elif step == "register":
                    produced = _register(cfg, state, client)
                else:
                    produced = _gate(cfg, state, client)
                _log_params_once(client, child, {k: v for k, v in produced.items() if not isinstance(v, dict)})
            state.steps[step] = produced
            _save(store, state)
            log.info("refresh %s: step %s done", state.id, step)
        state.done = True
        _save(store, state)
        client.set_terminated(parent)
        verdict = state.steps["gate"]
        return RefreshResult(f"refresh {state.id}: {cfg.register_as} version {state.steps['register']['version']} "
                             f"{'promoted to champion' if verdict['promoted'] else 'is challenger; champion kept'}: "
                             f"{verdict['reason']}", state, resumed)

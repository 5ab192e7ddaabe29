"""Stage-2 training: configs, state round trip and device order, one CPU step without Ray, and the
Ray Train pipeline (2 gloo workers, tiny 4x4 maps): a worker fault resumes from the checkpoint on
moto S3 with the same sample order and ends with the weights of an uninterrupted run; an MLflow
server records the run and the registered cvnet-rerank."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cvnet.config import TrainRerankConfig, load_config
from test_train_global import swap_params_on_conversion  # noqa: F401  (fixture)
from test_train_global import _optimizer_state_devices, tiny_synth  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent

TINY = ["data.image_size=64", "optim.batch_size=2", "optim.max_steps=4", "optim.warmup_steps=0",
        "checkpoint.every_steps=2", "scaling.num_workers=2", "log_every=1", "loader.workers=1",
        "hide_and_seek.grid=2", "curriculum.hard_share.end=0.5", "curriculum.has_prob.end=0.5",
        "curriculum.hard_share.ramp_steps=4", "curriculum.has_prob.ramp_steps=4"]


def test_shipped_configs_load():
    for name in ("rerank-demo", "rerank-synthetic", "rerank-gldv2-clean-r50", "rerank-gldv2-clean-r101"):
        cfg = load_config(TrainRerankConfig, ROOT / "configs" / f"{name}.yaml")
        assert cfg.negatives.top_k == 10 and cfg.curriculum.hard_share.end > 0
    demo = load_config(TrainRerankConfig, ROOT / "configs" / "rerank-demo.yaml")
    assert demo.data.image_size == 256 and demo.scaling.num_workers == 2


def test_rerank_scale_comes_from_the_config_else_from_the_init_checkpoint(workdir):
    from cvnet.models.checkpoints import save_checkpoint
    from pipelines.train_rerank import initial_model

    random = {"init": None, "init_seed": 0, "depth": 50}
    assert initial_model(random).rerank_scale == 1.0
    scaled = initial_model({**random, "rerank_scale": 2.0})
    assert scaled.rerank_scale == 2.0
    champion = str(workdir / "champion.pth")
    save_checkpoint(scaled, champion, {"stage": "rerank"})
    assert initial_model({**random, "init": champion}).rerank_scale == 2.0  # a refresh keeps it
    assert initial_model({**random, "init": champion, "rerank_scale": 1.5}).rerank_scale == 1.5


def _tiny_state(seed: int = 0):
    from pipelines.train_rerank import build_rerank, initial_model

    cfg = load_config(TrainRerankConfig, None, TINY + [f"model.init_seed={seed}"])
    model = initial_model(cfg.model.model_dump())
    return model, build_rerank(model, cfg.optim.model_dump())


def _toy_images(model, n=4, size=64):
    """A RerankImages-like batch: 2 anchors, each with a positive (its flip) and a negative."""
    from cvnet.training.pairs import PairBatch
    from cvnet.training.rerank_data import RerankImages

    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g)
    images[1] = images[0].flip(2)
    images[3] = images[2].flip(2)
    pairs = PairBatch(np.array([0, 2]), np.array([1, 3, 3, 1]), np.array([0, 0, 1, 1]),
                      np.array([1, 0, 1, 0]), np.array([False, True, False, False]))
    return RerankImages(0, images, np.array([0, 2]), np.array([1, 3, 3, 1]), pairs, 0.5, {})


def test_one_cpu_step_trains_the_reranker_only_and_the_state_round_trips():
    from cvnet.training.rerank_data import pair_maps
    from cvnet.training.rerank_step import freeze_backbone
    from pipelines.train_rerank import train_step

    model, state = _tiny_state()
    backbone = freeze_backbone(model)
    stem, learner = model.encoder_q.stem.conv.weight.clone(), model.cv_learner.mlp[0].weight.clone()
    batch = _toy_images(model)
    maps = pair_maps(backbone, batch, "cpu").hidden(0.5, [0, 0, 0], grid=2)
    metrics = train_step(state, maps, batch)
    assert np.isfinite(metrics["loss"]) and metrics["hard_share"] == 0.5 and state.step == 1
    assert torch.equal(model.encoder_q.stem.conv.weight, stem)  # frozen
    assert not torch.equal(model.cv_learner.mlp[0].weight, learner)
    assert len(state.sample_digests) == 1

    _, copy = _tiny_state(seed=1)
    copy.load_state_dict(state.state_dict())
    assert copy.step == 1 and copy.resumed_from == [1] and copy.sample_digests == state.sample_digests
    assert torch.equal(copy.core.cv_learner.mlp[0].weight, model.cv_learner.mlp[0].weight)


def _trained_payload():
    from cvnet.training.rerank_data import pair_maps
    from cvnet.training.rerank_step import freeze_backbone
    from pipelines.train_rerank import train_step

    model, state = _tiny_state()
    batch = _toy_images(model)
    train_step(state, pair_maps(freeze_backbone(model), batch, "cpu"), batch)
    return state.state_dict()


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_puts_the_optimizer_state_on_the_parameters_device(swap_params_on_conversion):
    """``meta`` stands in for a GPU: every AdamW state tensor ends on its parameter's device."""
    from pipelines.training import load_on_device

    payload = _trained_payload()
    _, state = _tiny_state()
    load_on_device(state, [state.scorer], payload, "meta")
    assert _optimizer_state_devices(state) == {(torch.device("meta"), torch.device("meta"))}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resume_on_gpu_then_a_step_runs():
    from cvnet.training.rerank_data import pair_maps
    from cvnet.training.rerank_step import freeze_backbone
    from pipelines.train_rerank import train_step
    from pipelines.training import load_on_device

    payload = _trained_payload()
    model, state = _tiny_state()
    backbone = freeze_backbone(model)
    load_on_device(state, [backbone, state.scorer], payload, "cuda")
    assert _optimizer_state_devices(state) == {(torch.device("cuda", 0), torch.device("cuda", 0))}
    batch = _toy_images(model)
    metrics = train_step(state, pair_maps(backbone, batch, "cuda"), batch)
    assert np.isfinite(metrics["loss"]) and state.step == 2


# ----------------------------------------------------------------------------- Ray Train (2 workers)

def write_negatives(uri: str, rows: pa.Table) -> int:
    """Commit a hard-negatives table (the DESIGN contract) with cvnet.tables; its version."""
    from cvnet import tables

    table = tables.open_or_create(uri, rows.schema, "hard_negatives", "image_id", {"test": 1})
    writer = tables.TableWriter(table, None)
    return writer.commit(tables.write_table_fragments(uri, rows), rows["image_id"].to_pylist())


@pytest.fixture
def negatives_table(tiny_synth, workdir):
    """Each image's negatives: the images of the next landmark (a fixed, valid 'mining')."""
    from cvnet.training.data import load_train_set

    ts = load_train_set(str(tiny_synth), "train_clean")
    nxt = [ts.members[(label + 1) % ts.num_classes] for label in ts.labels]
    rows = pa.table({
        "image_id": ts.image_ids, "landmark_id": ts.landmark_ids[ts.labels],
        "negative_ids": [[ts.image_ids[j] for j in m] for m in nxt],
        "negative_scores": [[1.0 - 0.1 * r for r in range(len(m))] for m in nxt]})
    uri = str(workdir / "negatives.lance")
    return uri, write_negatives(uri, rows)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_worker_fault_resumes_same_order_equal_weights_s3_and_mlflow(
        s3_bucket, mlflow_server, ray_local, tiny_synth, negatives_table, workdir):
    """Rank 0 raises at step 3 of a run whose checkpoints are on S3 (moto server) and whose MLflow
    is a server; Ray Train restarts the group, which resumes from step 2 and finishes. The run's
    per-step sample digests and its final re-ranker weights equal an uninterrupted run's; the
    server has the run (with the negatives' version as an input) and cvnet-rerank. The uninterrupted
    run loads synchronously, the faulted one through a loader process; both keep the stage-3 maps
    of 2 fixed views per image (map_cache.views) and draw half of the positives as self positives."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cvnet import storage
    from pipelines.train_rerank import FILES, fit_stage2, pin_negatives
    from pipelines.training import read_meta, read_state

    table, version = negatives_table
    # with the map cache and self positives: the restarted worker's empty cache recomputes the maps
    common = TINY + [f"data.root={tiny_synth}", f"negatives.table={table}", "map_cache.views=2",
                     "positives.self_share=0.5"]
    marker = workdir / "fault"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.faults", "3", str(marker),
         ray_local.get_runtime_context().gcs_address, "train-rerank", *common,
         "name=fault-s3", f"store={s3_bucket}", "checkpoint.max_failures=1",
         f"tracking_uri={mlflow_server['url']}", "experiment=test-stage2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert marker.read_text().startswith("step 3 ")  # the fault really happened
    printed = re.search(r"trained to step (\d+) \(resumed from \[(.*)\]\); model (\S+); "
                        r"MLflow run (\w+) at \S+; registered version (\d+)", proc.stdout)
    assert printed, proc.stdout
    step, resumed, model_uri, run_id, model_version = printed.groups()
    assert (step, resumed) == ("4", "2")
    faulted = storage.join(s3_bucket, "checkpoints", "fault-s3", "step_00000004")
    fs, _ = storage.filesystem(s3_bucket)
    assert fs.exists(storage.filesystem(storage.join(faulted, FILES.state))[1])
    assert model_uri.endswith("models/fault-s3/cvnet_rerank.pth")
    assert fs.exists(storage.filesystem(model_uri)[1])

    # the uninterrupted run makes its batches synchronously: the stream is the same either way
    clean_cfg = load_config(TrainRerankConfig, None, common + [
        "name=clean", f"store={workdir / 'store'}", "loader.workers=0"])
    clean = fit_stage2(pin_negatives(clean_cfg.model_dump()))
    assert clean.step == 4 and clean.resumed_from == []
    a, b = read_state(faulted, FILES), read_state(clean.checkpoint_path, FILES)
    assert a["resumed_from"] == [2] and len(a["sample_digests"]) == 4
    assert torch.equal(a["sample_digests"], b["sample_digests"])  # same pairs + views per step
    assert a["scorer"].keys() == b["scorer"].keys()
    assert all(torch.equal(a["scorer"][k], b["scorer"][k]) for k in a["scorer"])
    assert not all(torch.equal(a["scorer"][k], v) for k, v in _tiny_state()[1].core.state_dict().items())
    assert read_meta(faulted, FILES)["resumed_from"] == [2]

    client = MlflowClient(mlflow_server["url"])
    run = client.get_run(run_id)
    assert run.data.params["input.hard_negatives.version"] == str(version)
    assert run.data.params["negatives.version"] == str(version)
    assert set(m.step for m in client.get_metric_history(run_id, "loss")) == {1, 2, 3, 4}
    assert {"accuracy", "hard_share", "has_prob", "pairs_per_s"} <= set(run.data.metrics)
    assert client.get_model_version("cvnet-rerank", model_version).run_id == run_id
    mlflow.set_tracking_uri(mlflow_server["url"])  # the registry of the job, not this process's default
    info = mlflow.models.get_model_info(f"models:/cvnet-rerank/{model_version}")
    assert "python_function" in info.flavors and info.signature is not None  # a real MLflow model

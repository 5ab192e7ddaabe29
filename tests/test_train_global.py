"""Stage-1 training: configs, sampling, data loading, one CPU step without Ray, and the Ray Train
pipeline (2 gloo workers): fault recovery, driver-crash resume, checkpoints on moto S3 and an
MLflow server recording the run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from cvnet.training.data import (BatchLoader, TrainDataError, TrainSet, global_batch,
                                 train_set_from_manifest, worker_indices)
from jobs.config import ConfigError, TrainGlobalConfig, load_config

ROOT = Path(__file__).resolve().parent.parent

TINY = ["data.image_size=64", "optim.batch_size=4", "optim.max_steps=4", "optim.warmup_steps=0",
        "checkpoint.every_steps=2", "loss.queue_size=32", "model.freeze_stages=4",
        "scaling.num_workers=2", "log_every=1", "loader.workers=1"]


# ----------------------------------------------------------------------------- configs

def test_config_file_and_overrides():
    cfg = load_config(TrainGlobalConfig, ROOT / "configs" / "demo.yaml",
                      ["optim.lr=0.5", "data.flip=false", "model.backbone_init=/x/r50.pth"])
    assert cfg.optim.lr == 0.5 and cfg.data.flip is False
    assert cfg.model.backbone_init == "/x/r50.pth"
    assert (cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.model.depth) == (2, 1.0, 50)


@pytest.mark.parametrize("override,match", [
    (["optim.lrr=1"], "optim.lrr"),
    (["optim.lr=fast"], "optim.lr"),
    (["data.sampling=random"], "data.sampling"),
    (["optim"], "expected key=value"),
    (["optim.lr.x=1"], "optim.lr"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainGlobalConfig, None, override)


def test_shipped_configs_load():
    for name in ("demo", "gldv2-clean-r50", "gldv2-clean-r101"):
        cfg = load_config(TrainGlobalConfig, ROOT / "configs" / f"{name}.yaml")
        assert cfg.name
    r101 = load_config(TrainGlobalConfig, ROOT / "configs" / "gldv2-clean-r101.yaml")
    assert r101.model.depth == 101 and r101.loss.queue_size == 8192


# ----------------------------------------------------------------------------- data

def _train_set(n_classes: int = 5, per_class: int = 4) -> TrainSet:
    labels = np.repeat(np.arange(n_classes), per_class)
    return TrainSet([f"im{i}" for i in range(len(labels))], [f"u{i}" for i in range(len(labels))],
                    labels, np.arange(n_classes) * 10)


def test_worker_shards_are_disjoint_equal_and_deterministic():
    ts = _train_set()
    for step in range(7):
        a = worker_indices(ts, step, 3, 0, 2, seed=1, sampling="uniform")
        b = worker_indices(ts, step, 3, 1, 2, seed=1, sampling="uniform")
        assert len(a) == len(b) == 3 and not set(a) & set(b)
        assert np.array_equal(a, worker_indices(ts, step, 3, 0, 2, seed=1, sampling="uniform"))
    # uniform: an epoch (20 // 6 = 3 steps) visits distinct images
    epoch = np.concatenate([global_batch(ts, s, 6, 1, "uniform") for s in range(3)])
    assert len(set(epoch.tolist())) == 18


def test_balanced_sampling_draws_classes_uniformly():
    labels = np.array([0] * 50 + [1] * 2 + [2] * 2)
    ts = TrainSet([str(i) for i in range(54)], ["u"] * 54, labels, np.array([1, 2, 3]))
    drawn = np.concatenate([global_batch(ts, s, 30, 0, "balanced") for s in range(20)])
    share = np.bincount(ts.labels[drawn], minlength=3) / len(drawn)
    assert np.all(np.abs(share - 1 / 3) < 0.06)


def test_manifest_without_landmark_is_named():
    table = pa.table({"image_id": ["a", "b"], "uri": ["x", "y"],
                      "landmark_id": pa.array([1, None], pa.int64()), "split": ["t", "t"]})
    with pytest.raises(TrainDataError, match="'b' has no landmark_id"):
        train_set_from_manifest(table)
    table = pa.table({"image_id": ["a", "b", "c"], "uri": ["x", "y", "z"],
                      "landmark_id": pa.array([7, 3, 7], pa.int64()), "split": ["t"] * 3})
    ts = train_set_from_manifest(table, "t")
    assert ts.landmark_ids.tolist() == [3, 7] and ts.labels.tolist() == [1, 0, 1]


def test_batch_loader_records_and_replaces_bad_images():
    import cv2

    ok = cv2.imencode(".jpg", np.full((40, 50, 3), 128, np.uint8))[1].tobytes()
    files = {"u0": ok, "u1": b"not a jpeg", "u2": ok, "u3": ok}
    ts = TrainSet(["a", "b", "c", "d"], ["u0", "u1", "u2", "u3"], np.array([0, 0, 1, 1]),
                  np.array([5, 6]))
    loader = BatchLoader(ts, 32, (0.5, 1.0), True, files.__getitem__)
    q, k, labels = loader.load(np.array([1, 2]), np.random.default_rng(0))
    assert q.shape == k.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    assert [row["image_id"] for row in loader.bad_inputs.values()] == ["b"]
    assert "b: not a decodable image" in loader.bad_inputs[1]["error"]
    files["u0"] = b""
    with pytest.raises(TrainDataError, match="landmark 5: no readable image"):
        loader.load(np.array([0]), np.random.default_rng(0))


# ----------------------------------------------------------------------------- one step, no Ray

def test_train_step_cpu_updates_everything_and_state_round_trips():
    from cvnet.training.steps import build_global_net, build_stage1, set_train_mode, train_step

    cfg = load_config(TrainGlobalConfig, None, TINY + ["model.freeze_stages=3"])
    torch.manual_seed(0)
    net = build_global_net(50, init_seed=0)
    state, frozen = build_stage1(net, 3, cfg.loss.model_dump(), cfg.optim.model_dump(), 3)
    set_train_mode(state.model, frozen)
    state.momentum.follow_modes(net)
    assert not net.s3.training and net.s4.training
    assert state.momentum.encoder.s4.training and not state.momentum.encoder.s3.training
    s3_before = net.s3.b1.f.a.weight.clone()
    fc_before = net.head.fc.weight.clone()
    ema_before = state.momentum.encoder.head.fc.weight.clone()
    x = torch.randn(4, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 0])
    out = train_step(state, x, x.flip(3), labels, 0.5, 0.5)
    assert np.isfinite(out["loss"]) and out["loss_con"] > 0 and out["loss_cls"] > 0
    assert state.step == 1
    assert torch.equal(net.s3.b1.f.a.weight, s3_before)  # frozen
    assert not torch.equal(net.head.fc.weight, fc_before)
    ema = state.momentum.encoder.head.fc.weight
    expected = 0.999 * ema_before + 0.001 * net.head.fc.weight
    assert torch.allclose(ema, expected, atol=1e-6)
    assert state.queue.labels[:4].tolist() == [0, 1, 2, 0] and int(state.queue.ptr) == 4

    net2 = build_global_net(50, init_seed=1)
    copy, _ = build_stage1(net2, 3, cfg.loss.model_dump(), cfg.optim.model_dump(), 3)
    copy.load_state_dict(state.state_dict())
    assert copy.step == 1 and copy.resumed_from == [1]
    assert torch.equal(net2.head.fc.weight, net.head.fc.weight)
    assert torch.equal(copy.queue.descriptors, state.queue.descriptors)
    assert copy.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()



def test_train_step_clips_the_global_gradient_norm():
    """With clip_grad_norm the applied gradient has at most that norm; grad_norm reports the
    norm before clipping (a random trunk's first gradients are far larger)."""
    from cvnet.training.steps import build_global_net, build_stage1, train_step

    cfg = load_config(TrainGlobalConfig, None, TINY + ["optim.momentum=0", "optim.weight_decay=0"])
    net = build_global_net(50, init_seed=0)
    state, _ = build_stage1(net, 3, cfg.loss.model_dump(), cfg.optim.model_dump(), 3)
    before = {n: p.detach().clone() for n, p in state.model.named_parameters() if p.requires_grad}
    x = torch.randn(4, 3, 64, 64)
    out = train_step(state, x, x.flip(3), torch.tensor([0, 1, 2, 0]), 0.5, 0.5, clip_grad_norm=0.01)
    lr = out["lr"]
    step = torch.cat([(before[n] - p.detach()).flatten() for n, p in state.model.named_parameters()
                      if p.requires_grad])
    assert out["grad_norm"] > 0.01
    assert float(step.norm()) / lr == pytest.approx(0.01, rel=1e-3)


def test_train_step_bf16_autocast_on_cpu():
    """The mixed-precision path (bf16 autocast) runs and keeps fp32 master weights."""
    from cvnet.training.steps import build_global_net, build_stage1, train_step

    cfg = load_config(TrainGlobalConfig, None, TINY)
    net = build_global_net(50, init_seed=0)
    state, _ = build_stage1(net, 2, cfg.loss.model_dump(), cfg.optim.model_dump(), 4)
    x = torch.randn(2, 3, 64, 64)
    out = train_step(state, x, x, torch.tensor([0, 1]), 0.5, 0.5, bf16=True)
    assert np.isfinite(out["loss"]) and net.head.fc.weight.dtype == torch.float32


def test_center_head_removes_the_common_descriptor_direction():
    from cvnet.training.steps import build_global_net, center_head

    net = build_global_net(50, init_seed=0).eval()
    x = torch.randn(6, 3, 64, 64)
    before = net(x)
    center_head(net, x)
    with torch.no_grad():
        raw = net.head(net.forward_trunk(x))
    assert raw.mean(dim=0).abs().max() < 1e-3 * raw.abs().max()
    off = ~torch.eye(6, dtype=torch.bool)
    assert (net(x) @ net(x).T)[off].mean() < (before @ before.T)[off].mean()

def _stage1_after_one_step():
    from cvnet.training.steps import build_global_net, build_stage1, train_step

    cfg = load_config(TrainGlobalConfig, None, TINY)
    state, _ = build_stage1(build_global_net(50, 0), 2, cfg.loss.model_dump(),
                            cfg.optim.model_dump(), 4)
    x = torch.randn(2, 3, 64, 64)
    train_step(state, x, x, torch.tensor([0, 1]), 0.5, 0.5)
    fresh, _ = build_stage1(build_global_net(50, 1), 2, cfg.loss.model_dump(),
                            cfg.optim.model_dump(), 4)
    return state.state_dict(), fresh


def _optimizer_state_devices(state) -> set[tuple[torch.device, torch.device]]:
    """(state tensor device, its parameter's device) of every optimizer state tensor of
    ``state.optimizer`` (either stage)."""
    params = {id(p): p for group in state.optimizer.param_groups for p in group["params"]}
    return {(value.device, params[id(p)].device) for p, slots in state.optimizer.state.items()
            for value in slots.values() if torch.is_tensor(value) and value.dim()}


def _modules(state):
    return [state.model, state.momentum, state.queue, state.con_loss]


@pytest.fixture
def swap_params_on_conversion():
    """``module.to`` keeps each Parameter object (as a CPU -> GPU move does; a move to ``meta``
    would otherwise make new ones, which the optimizer does not hold)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_moves_to_the_device_before_the_optimizer_state_loads(swap_params_on_conversion):
    """load_on_device: every optimizer state tensor ends on its parameter's device. The
    ``meta`` device stands in for a GPU on the CPU; loading first, then moving (the old order)
    leaves the momentum buffers behind on the CPU, which this test tells apart."""
    from pipelines.training import load_on_device

    payload, state = _stage1_after_one_step()
    load_on_device(state, _modules(state), payload, "meta")
    devices = _optimizer_state_devices(state)
    assert devices and devices == {(torch.device("meta"), torch.device("meta"))}
    assert state.step == 1 and state.resumed_from == [1]

    payload, old_order = _stage1_after_one_step()
    old_order.load_state_dict(payload)
    for module in _modules(old_order):
        module.to("meta")
    assert (torch.device("cpu"), torch.device("meta")) in _optimizer_state_devices(old_order)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resume_on_gpu_then_a_step_runs():
    """Stage 1 resumed onto a GPU: optimizer state on the GPU and the next step runs."""
    from cvnet.training.steps import train_step
    from pipelines.training import load_on_device

    payload, state = _stage1_after_one_step()
    load_on_device(state, _modules(state), payload, "cuda")
    assert _optimizer_state_devices(state) == {(torch.device("cuda", 0), torch.device("cuda", 0))}
    x = torch.randn(2, 3, 64, 64, device="cuda")
    out = train_step(state, x, x, torch.tensor([0, 1], device="cuda"), 0.5, 0.5)
    assert np.isfinite(out["loss"]) and state.step == 2

# ----------------------------------------------------------------------------- Ray Train (2 workers)

@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    """A small synthetic GLDv2 training set (6 landmarks x 4 images, 64 px)."""
    from cvnet.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth") / "c"
    generate(str(out), seed=3, landmarks=6, images_per_landmark=4, queries=5, distractors=0,
             size=64)
    return out / "gldv2"


def _tiny_overrides(name: str, store: str, root, extra: list[str]) -> list[str]:
    return TINY + [f"name={name}", f"store={store}", f"data.root={root}", *extra]


def _run_with_fault(cluster, marker: Path, cvnet_args: list[str]) -> subprocess.CompletedProcess:
    """``cvnet <args>`` as its own Ray driver on the test cluster; its rank-0 worker raises once
    at step 3 (``tests.faults``: a worker setup hook, the code under test has no fault hook)."""
    return subprocess.run(
        [sys.executable, "-m", "tests.faults", "3", str(marker),
         cluster.get_runtime_context().gcs_address, *cvnet_args],
        cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_worker_fault_resumes_from_checkpoint_on_s3_with_mlflow_server(
        s3_bucket, mlflow_server, ray_local, tiny_synth, workdir):
    """A worker raises at step 3; Ray Train restarts the group, which resumes from the step-2
    checkpoint on S3 (moto server) and finishes; the MLflow server records the run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cvnet import storage

    marker = workdir / "fault"
    proc = _run_with_fault(ray_local, marker, ["train-global", *_tiny_overrides(
        "fault-s3", s3_bucket, tiny_synth,
        ["checkpoint.max_failures=1", f"tracking_uri={mlflow_server['url']}",
         "experiment=test-stage1"])])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert marker.read_text().startswith("step 3 ")  # the fault really happened
    printed = re.search(r"trained to step (\d+) \(resumed from \[(.*)\]\); model (\S+); "
                        r"MLflow run (\w+) at \S+; registered version (\d+)", proc.stdout)
    assert printed, proc.stdout
    step, resumed, model_uri, run_id, model_version = printed.groups()
    assert (step, resumed) == ("4", "2")  # resumed from the step-2 checkpoint, finished
    fs, _ = storage.filesystem(s3_bucket)
    run_dir = storage.join(s3_bucket, "checkpoints", "fault-s3")
    assert fs.exists(storage.filesystem(
        storage.join(run_dir, "step_00000004", "stage1_state.pt"))[1])
    assert fs.exists(storage.filesystem(model_uri)[1])
    client = MlflowClient(mlflow_server["url"])
    run = client.get_run(run_id)
    assert run.data.params["optim.batch_size"] == "4"
    loss_steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert set(loss_steps) == {1, 2, 3, 4}  # steps 3 and 4 logged after the resume
    assert {"loss_cls", "loss_con", "lr", "images_per_s"} <= set(run.data.metrics)
    version = client.get_model_version("cvnet-global", model_version)
    assert version.run_id == run_id
    mlflow.set_tracking_uri(mlflow_server["url"])  # the registry of the job, not this process's default
    info = mlflow.models.get_model_info(f"models:/cvnet-global/{model_version}")
    assert "python_function" in info.flavors and info.signature is not None  # a real MLflow model


@pytest.mark.slow
def test_driver_crash_then_rerun_with_same_name_resumes(workdir, ray_local, tiny_synth):
    """Without retries the fault ends the job (like a crashed driver); fitting again under the
    same run name resumes from the last checkpoint instead of step 0."""
    from pipelines.train_global import fit_stage1, load_trained_net

    store = str(workdir / "store")
    overrides = _tiny_overrides("crash", store, tiny_synth, ["checkpoint.max_failures=0"])
    staged = set(Path(tempfile.gettempdir()).glob("cvnet-train-global-*"))
    marker = workdir / "fault"
    proc = _run_with_fault(ray_local, marker, ["train-global", *overrides])
    assert proc.returncode == 1 and "InjectedFault: injected fault at step 3" in proc.stderr, \
        proc.stderr[-4000:]
    assert marker.read_text().startswith("step 3 ")
    result = fit_stage1(load_config(TrainGlobalConfig, None, overrides).model_dump())
    assert result.step == 4 and result.resumed_from == [2]
    # each checkpoint's local staging folder is gone once the store has it
    assert set(Path(tempfile.gettempdir()).glob("cvnet-train-global-*")) <= staged
    meta = json.loads((workdir / "store" / "checkpoints" / "crash" / "step_00000004" /
                       "stage1_meta.json").read_text())
    assert meta["step"] == 4 and len(meta["landmark_ids"]) == 6
    net = load_trained_net(result.checkpoint_path)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2048)

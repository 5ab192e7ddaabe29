"""``cvnet refresh`` end to end on a tiny synthetic collection, with the registry on a real
``mlflow server`` and Ray: the steps, the gate applied (worse: champion kept, challenger set;
better: promoted, previous kept), nothing new, a kill mid-training then a resume, the lease
refusing a second refresh, and ``cvnet submit refresh --period`` on a ``ray start --head`` cluster."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"data": {"image_size": 64}, "optim": {"max_steps": 4, "batch_size": 2, "warmup_steps": 0},
         "checkpoint": {"every_steps": 2}, "scaling": {"num_workers": 1}, "loader": {"workers": 0},
         "log_every": 1, "hide_and_seek": {"grid": 2}}


def test_step_sections_are_checked_before_any_work_and_name_the_key():
    from cvnet.config import ConfigError, RefreshConfig, load_config
    from pipelines.refresh import check_config

    for shipped in ("refresh", "refresh-demo"):
        check_config(load_config(RefreshConfig, ROOT / "configs" / f"{shipped}.yaml"))
    base = {"manifests": ["m.parquet"], "benchmark": "b", "train": {"data": {"root": "r"}}}
    for section, error in (({"extract": {"model": "x"}}, "extract.model: set by the refresh"),
                           ({"mine": {"kep": 3}}, "mine.kep: Extra inputs"),
                           ({"train": {"data": {"root": "r"}, "optim": {"lr": -1}}}, "train.optim.lr:"),
                           ({"train": {}}, "train.data.root: the stage-2 training set is required")):
        with pytest.raises(ConfigError, match=error):
            check_config(RefreshConfig.model_validate(base | section))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A synthetic GLDv2 set (5 landmarks x 3 images, 64 px; 10 in train_clean), its benchmark
    and three growing manifests of train_clean (the collection as new images arrive)."""
    from cvnet.data.gldv2 import gldv2_inventory
    from cvnet.data.manifest import write_manifest
    from cvnet.data.synthetic import generate

    out = tmp_path_factory.mktemp("refresh-synth")
    generate(str(out / "c"), seed=5, landmarks=5, images_per_landmark=3, queries=2, distractors=0, size=64)
    root = out / "c" / "gldv2"
    table, _ = gldv2_inventory(str(root), "train_clean", verify_md5=False)
    manifests = []
    for n in (table.num_rows - 4, table.num_rows - 2, table.num_rows):
        path = out / f"manifest-{n}.parquet"
        write_manifest(table.slice(0, n), str(path))
        manifests.append(str(path))
    bench = next((out / "c" / "revisitop").iterdir())
    return {"root": str(root), "benchmark": str(bench), "manifests": manifests, "ids": table["image_id"].to_pylist()}


@pytest.fixture
def champions(mlflow_server, tmp_path):
    """``cvnet-global-*`` / ``cvnet-rerank-*`` (names unique to the test) with a synthetic-weight
    CVNet registered as version 1, the champion of both."""
    import mlflow

    from cvnet.models.checkpoints import save_checkpoint
    from cvnet.models.cvnet import CVNet
    from cvnet.models.synthetic_weights import synthetic_state_dict
    from cvnet.pyfunc import log_cvnet_model
    from cvnet.registry import aliases, register_model

    mlflow.set_tracking_uri(mlflow_server["url"])
    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 1))
    checkpoint = str(tmp_path / "cvnet.pth")
    save_checkpoint(model, checkpoint)
    suffix = uuid.uuid4().hex[:6]
    names = {"global": f"cvnet-global-{suffix}", "rerank": f"cvnet-rerank-{suffix}"}
    mlflow.set_experiment(f"refresh-setup-{suffix}")
    with mlflow.start_run():
        for kind, name in names.items():
            register_model(name, log_cvnet_model(checkpoint, kind).model_uri)
            assert aliases(name).champion == "1"
    return names


def _config(collection, champions, mlflow_server, store, address, manifests, min_gain=0.0) -> dict:
    return {"manifests": manifests, "benchmark": collection["benchmark"], "store": str(store),
            "global_model": f"models:/{champions['global']}@champion",
            "rerank_model": f"models:/{champions['rerank']}@champion", "register_as": champions["rerank"],
            "promote": {"metric": "rerank_topk_medium_map", "min_gain": min_gain},
            "tracking_uri": mlflow_server["url"], "address": address, "experiment": "test-refresh",
            "extract": {"scales": [1.0], "shard_size": 4}, "mine": {"keep": 4, "k": 2, "shard_size": 4},
            "train": {**TRAIN, "data": {**TRAIN["data"], "root": collection["root"]}},
            "evaluate": {"k": 5, "scales": [1.0]}}


def _command(cfg: dict, folder: Path) -> list[str]:
    """``cvnet refresh --config FILE`` (its own Ray driver, attached to the test cluster)."""
    path = folder / f"refresh-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "jobs.cli", "refresh", "--config", str(path)]


def _refresh(cfg: dict, folder: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run a refresh to its end; the output and the state of the refresh it ran (or resumed)."""
    done = subprocess.run(_command(cfg, folder), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done, _state(Path(cfg["store"]))


def _state(store: Path) -> dict | None:
    """The state of the store's latest refresh."""
    pointer = store / "refresh" / "open.json"
    if not pointer.exists():
        return None
    return json.loads((store / "refresh" / json.loads(pointer.read_text())["id"] / "state.json").read_text())


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, f"the refresh ended (rc {proc.returncode}) before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_while_training(cfg: dict, folder: Path) -> dict:
    """Start a refresh, check that a second one of the same store refuses while the first holds
    it, then SIGKILL the first at once after Ray Train has reported its first stage-2 checkpoint
    (a step folder alone may not be reported yet), well before the last step: a kill after the
    last report would leave the rerun nothing to train. The state of the killed refresh."""
    store = Path(cfg["store"])
    command = _command(cfg, folder)
    with open(folder / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            state = _wait_for(lambda: _state(store), first, "the refresh state")
            second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert second.returncode == 3, second.stdout + second.stderr[-3000:]
            assert f"pid {first.pid}) since " in second.stderr and "is held by cvnet refresh" in second.stderr
            snapshot = store / "checkpoints" / f"refresh-{state['id']}" / "checkpoint_manager_snapshot.json"
            _wait_for(lambda: snapshot.exists() and '"checkpoint_dir_name"' in snapshot.read_text(), first,
                      "a reported stage-2 checkpoint")  # Ray Train's list of reported checkpoints
            os.killpg(first.pid, signal.SIGKILL)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == -signal.SIGKILL  # the kill really happened
    killed = _state(store)
    assert killed["id"] == state["id"] and set(killed["steps"]) == {"extract", "mine"}  # killed in training
    return killed


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_refresh_killed_resumed_gated_then_promoted_then_nothing_new_once_per_period(
        collection, champions, mlflow_server, ray_local, ray_head, workdir, monkeypatch, caplog):
    """The refreshes of one store as images arrive:

    1. a refresh is killed (SIGKILL) while training, after its first checkpoint; meanwhile a
       second refresh of the store refuses, naming the holder and since when;
    2. the rerun resumes the same refresh at the training step (from the checkpoint); its
       candidate misses ``min_gain``: champion kept, the candidate is challenger;
    3. nothing is new: a refresh says so and exits 0 before any heavy work;
    4. new images, a reachable bar: a new refresh extracts only them, re-mines, trains from the
       champion on the new hard-negatives version, promotes and keeps the old champion as
       ``previous``; MLflow has its parent run and one child run per step;
    5. ``cvnet submit refresh --period 1d`` runs once per period on a ``ray start --head`` cluster.
    """
    import logging

    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from cvnet import features
    from cvnet.registry import aliases
    from jobs import submit

    store, name, n = workdir / "store", champions["rerank"], len(collection["ids"])
    client = MlflowClient(mlflow_server["url"])
    address = ray_local.get_runtime_context().gcs_address
    cfg = _config(collection, champions, mlflow_server, store, address, collection["manifests"][:1], min_gain=1000.0)
    cfg["train"]["optim"]["max_steps"] = 8
    killed = _kill_while_training(cfg, workdir)

    done, worse = _refresh(cfg, workdir)
    assert "resumed after the steps extract, mine" in done.stdout, done.stdout
    assert worse["id"] == killed["id"] and worse["done"]
    first = worse["steps"]
    assert first["extract"] == killed["steps"]["extract"]  # not redone
    assert first["train"]["resumed_from"] and first["train"]["step"] == 8, (workdir / "first.log").read_text()[-3000:]
    assert "is challenger; champion kept" in done.stdout, done.stdout
    assert first["gate"]["promoted"] is False and "keep the champion" in first["gate"]["reason"]
    assert aliases(name).champion == "1" and aliases(name).challenger == first["register"]["version"] == "2"
    assert worse["pinned"] == {"global": f"models:/{champions['global']}/1", "rerank": f"models:/{name}/1"}
    assert first["extract"]["manifest_0_images"] == n - 4 and first["mine"]["rows"] == n - 4
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.version for v in versions) == ["1", "2"]  # the killed run registered nothing
    assert [v.version for v in versions if v.tags.get("cvnet.refresh_id") == worse["id"]] == ["2"]

    assert "attaching to Ray" in done.stderr
    done, after = _refresh(cfg, workdir)
    assert "nothing new to do" in done.stdout and after["id"] == worse["id"], done.stdout
    assert "attaching to Ray" not in done.stderr  # decided before starting any heavy work
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    cfg = _config(collection, champions, mlflow_server, store, address, collection["manifests"][2:], min_gain=-1000.0)
    done, better = _refresh(cfg, workdir)
    second = better["steps"]
    assert better["id"] != worse["id"] and "promoted to champion" in done.stdout, done.stdout
    assert aliases(name).champion == second["register"]["version"] == "3"
    assert aliases(name).previous == "1" and aliases(name).challenger == "3"
    assert second["extract"]["manifest_0_images"] == 4  # the new images only
    assert second["extract"]["features"] == first["extract"]["features"]  # one table per model, grown
    assert second["mine"]["hard_negatives_version"] > first["mine"]["hard_negatives_version"]
    assert second["train"]["input.hard_negatives.version"] == second["mine"]["hard_negatives_version"]
    ids, _ = features.read_descriptors(second["extract"]["features"])
    assert sorted(ids) == sorted(collection["ids"])  # nothing lost, nothing doubled
    version = client.get_model_version(name, "3")
    assert version.tags["cvnet.refresh_id"] == better["id"]
    assert float(version.tags["rerank_topk_medium_map"]) == second["evaluate"]["candidate_metrics"]["rerank_topk_medium_map"]
    experiment = client.get_experiment_by_name("test-refresh").experiment_id
    parent = client.search_runs([experiment], f"tags.`cvnet.train_name` = 'refresh-{better['id']}'")[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["cvnet.train_name"].rsplit("/", 1)[1] for r in children) == sorted(
        ["extract", "mine", "train", "evaluate", "register", "gate"])
    by_step = {r.data.tags["cvnet.train_name"].rsplit("/", 1)[1]: r for r in children}
    assert by_step["mine"].data.params["hard_negatives_version_written"] == str(second["mine"]["hard_negatives_version"])
    assert by_step["train"].data.params["input.hard_negatives.version"] == str(second["mine"]["hard_negatives_version"])
    assert "loss" in by_step["train"].data.metrics  # the training workers logged into the step's run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.INFO, logger="cvnet.submit")
    config = _command(cfg, workdir)[-1]  # the config file of the last refresh: nothing new
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    args = ["refresh", "--config", config, "--address", ray_head, "--period", "1d", "--wait"]
    night = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)
    for now in (night, night + timedelta(hours=20), night + timedelta(days=1)):
        assert submit.run(parser.parse_args(args), now=now) == 0
    assert "exists (SUCCEEDED); not submitting again" in caplog.text
    prefix = submit.submission_id("refresh", ["--config", config]) + "-1d-"
    jobs = JobSubmissionClient(ray_head)
    ids = sorted(j.submission_id for j in jobs.list_jobs() if (j.submission_id or "").startswith(prefix))
    assert ids == [prefix + "20261201T0000Z", prefix + "20261202T0000Z"]
    assert all("nothing new to do" in jobs.get_job_logs(i) for i in ids)

"""``cvnet submit`` (and plain ``ray job submit``) through the Ray Jobs API against a
``ray start --head`` cluster; submission ids per period; the cluster-path fail-fast."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest


ROOT = Path(__file__).resolve().parent.parent


def test_submit_splits_own_options_and_ids_are_deterministic():
    from jobs import submit

    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    args = submit.split_args(parser.parse_args(
        ["extract", "--manifest", "m.parquet", "--address", "http://h:8265", "--wait", "--shard-size", "4"]))
    assert (args.job, args.address, args.wait) == ("extract", "http://h:8265", True)
    assert args.job_args == ["--manifest", "m.parquet", "--shard-size", "4"]
    one = submit.submission_id("extract", args.job_args)
    assert one == submit.submission_id("extract", list(args.job_args))
    assert one != submit.submission_id("extract", ["--manifest", "other.parquet"])
    env = submit.runtime_env(str(ROOT), "http://minio:9000")
    assert {".venv/", ".git/", "cvnet-store/"} <= set(env["excludes"])
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert not any("SECRET" in k or "ACCESS_KEY" in k for k in env["env_vars"])


def test_period_ids_follow_utc_buckets_with_an_injected_clock():
    from jobs import submit

    args = ["--config", "configs/refresh.yaml"]
    t = datetime(2026, 12, 1, 0, 30, tzinfo=timezone.utc)
    day = submit.submission_id("refresh", args, "1d", t)
    assert day.startswith(submit.submission_id("refresh", args) + "-1d-")  # no period: as before
    assert day.endswith("-1d-20261201T0000Z")
    assert submit.submission_id("refresh", args, "1d", t + timedelta(hours=23, minutes=29)) == day
    assert submit.submission_id("refresh", args, "1d", t + timedelta(hours=23, minutes=30)).endswith(
        "-1d-20261202T0000Z")
    local = datetime(2026, 12, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))  # 2026-11-30 23:30 UTC
    assert submit.submission_id("refresh", args, "1d", local).endswith("-1d-20261130T0000Z")
    assert submit.period_start("6h", t + timedelta(hours=13)) == datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
    assert submit.period_start("30m", t + timedelta(minutes=59)) == t.replace(hour=1, minute=0)
    monday = submit.period_start("1w", datetime(2026, 12, 6, 23, 0, tzinfo=timezone.utc))  # a Sunday
    assert monday == datetime(2026, 11, 30, tzinfo=timezone.utc) and monday.weekday() == 0
    assert submit.submission_id("refresh", args, "1d", t) != submit.submission_id("refresh", ["x"], "1d", t)
    for bad in ("0d", "1y", "d", "1.5h", ""):
        with pytest.raises(ValueError, match="expected a count and a unit m, h, d or w"):
            submit.period_start(bad, t)
    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    parsed = submit.split_args(parser.parse_args(["extract", "--manifest", "m", "--period", "6h"]))
    assert (parsed.period, parsed.job_args) == ("6h", ["--manifest", "m"])
    with pytest.raises(SystemExit):  # argparse names the bad --period
        submit.split_args(parser.parse_args(["extract", "--period", "6x"]))


def test_cluster_job_with_remote_store_and_local_tracking_fails_fast(monkeypatch, tmp_path):
    from cvnet.tracking import TrackingConfigError, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("s3://b/x") == f"sqlite:///{tmp_path}/mlflow.db"  # no cluster: fine
    assert resolve_tracking_uri("s3://b/x", "http://mlflow:5000", address="http://h:8265") == "http://mlflow:5000"
    store = str(tmp_path / "store")
    assert resolve_tracking_uri(store, address="http://h:8265") == f"sqlite:///{store}/mlflow.db"
    for local in (None, "sqlite:////data/mlflow.db", "/data/mlruns", "file:///data/mlruns"):
        with pytest.raises(TrackingConfigError, match="give --tracking-uri \\(or set MLFLOW_TRACKING_URI\\)"):
            resolve_tracking_uri("s3://b/x", local, address="http://h:8265")
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # what the driver of a Ray job has
    with pytest.raises(TrackingConfigError, match="s3://b/x"):
        resolve_tracking_uri("s3://b/x")


@pytest.mark.slow
def test_submit_extract_runs_on_the_cluster(ray_head, tmp_path):
    from cvnet import features
    from cvnet.data.manifest import write_manifest
    from cvnet.models.checkpoints import extractor_sha256, save_checkpoint
    from cvnet.models.cvnet import CVNet
    from cvnet.models.synthetic_weights import synthetic_state_dict
    from pipelines.extract import default_output
    from test_extract_pipeline import write_set

    rows = write_set(tmp_path, 4)
    write_manifest(pa.Table.from_pylist(rows), str(tmp_path / "manifest.parquet"))
    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 1))
    save_checkpoint(model, str(tmp_path / "model.pt"))
    store = tmp_path / "store"
    command = [sys.executable, "-m", "jobs.cli", "submit", "extract",
               "--manifest", str(tmp_path / "manifest.parquet"), "--model", str(tmp_path / "model.pt"),
               "--store", str(store), "--shard-size", "4", "--max-bad-fraction", "1", "--address", ray_head, "--wait"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # default tracking
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    shown = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, shown
    job_id = done.stdout.strip().splitlines()[0]
    assert job_id.startswith("cvnet-extract-"), shown
    assert "processed 7 images (3 bad inputs" in done.stdout, shown  # the job's own log, followed
    output = default_output(str(store), str(tmp_path / "model.pt"), extractor_sha256(str(tmp_path / "model.pt")))
    ids, X = features.read_descriptors(output)
    assert sorted(ids) == ["g0", "g1", "g2", "g3"] and X.shape == (4, 2048)
    assert (store / "mlflow.db").exists()
    # the same submission again reuses the finished job instead of running it twice
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    shown = again.stdout[-3000:] + again.stderr[-3000:]
    assert again.returncode == 0 and again.stdout.strip().splitlines()[0] == job_id, shown
    assert "exists (SUCCEEDED)" in again.stderr, shown


def _submit_args(*argv: str) -> argparse.Namespace:
    from jobs import submit

    parser = argparse.ArgumentParser()
    submit.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_submit_with_period_runs_once_per_period(ray_head, monkeypatch, caplog):
    """Twice in one period: one job (the second submission finds it); the next period: a new job.
    The clock is injected through ``submit.run(args, now=...)``."""
    import logging

    from ray.job_submission import JobSubmissionClient

    from jobs import submit

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.INFO, logger="cvnet.submit")
    args = ("synth", "--help", "--address", ray_head, "--period", "1d", "--wait")
    night = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)
    assert submit.run(_submit_args(*args), now=night) == 0
    assert submit.run(_submit_args(*args), now=night + timedelta(hours=20)) == 0  # same UTC day
    assert "exists (SUCCEEDED); not submitting again" in caplog.text
    assert submit.run(_submit_args(*args), now=night + timedelta(days=1)) == 0
    prefix = submit.submission_id("synth", ["--help"]) + "-1d-"
    jobs = {j.submission_id: j for j in JobSubmissionClient(ray_head).list_jobs()
            if (j.submission_id or "").startswith(prefix)}
    assert sorted(jobs) == [prefix + "20261201T0000Z", prefix + "20261202T0000Z"]
    assert {j.status.value for j in jobs.values()} == {"SUCCEEDED"}


def test_submitted_job_with_s3_store_and_default_tracking_fails_fast(ray_head, monkeypatch, capsys):
    from jobs import submit

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = _submit_args("train-global", "--config", "configs/demo.yaml", "store=s3://cvnet-nowhere/x",
                        "--address", ray_head, "--wait")
    assert submit.run(args) == 1
    out = capsys.readouterr().out
    assert "TrackingConfigError" in out and "give --tracking-uri (or set MLFLOW_TRACKING_URI)" in out, out[-2000:]
    assert "step" not in out.split("TrackingConfigError")[0].lower()  # failed before any training


RAY_JOB_EXCLUDES = [".venv", ".git", "cvnet-store", "tmp", "bench/results", "**/__pycache__"]
PROBE = """
import os, ray
from pipelines.ray_runtime import init_ray
init_ray()
look = ray.remote(lambda: (os.path.exists("cvnet/registry.py"), os.path.exists(".venv"), os.environ["CVNET_STORE"]))
print("PROBE", *ray.get(look.remote()), os.path.exists(".venv"))
"""


def test_plain_ray_job_submit_line_uploads_the_code_without_venv(ray_head, tmp_path):
    """The README's ``ray job submit`` line: working dir ``.`` without .venv and the store, env
    vars for every worker (RAY_OVERRIDE_JOB_RUNTIME_ENV lets the driver's init_ray add its own)."""
    runtime_env = {"excludes": RAY_JOB_EXCLUDES,
                   "env_vars": {"CVNET_STORE": str(tmp_path / "store"), "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
                                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}}
    command = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_head,
               "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-c", PROBE]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    shown = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, shown
    assert f"PROBE True False {tmp_path / 'store'} False" in done.stdout, shown

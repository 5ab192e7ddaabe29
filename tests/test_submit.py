"""``cvnet submit`` through the Ray Jobs API against a ``ray start --head`` cluster, and cluster.yaml."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from conftest import free_port, stop_process, wait_http

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_ray_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema error
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["cpu_data"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "gpu" in types["gpu"]["docker"]["worker_image"]
    assert any("requirements.txt" in c for c in config["setup_commands"])


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


@pytest.fixture
def ray_head():
    """A separate ``ray start --head`` cluster (own process group, stopped by its pid)."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray needs a short socket path
    port, dash = free_port(), free_port()
    # every fixed default port gets a free one: other Ray clusters may share this machine
    extra = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
         f"--dashboard-port={dash}", "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
         "--disable-usage-stats", "--include-dashboard=true", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_http(url + "/api/version", timeout=120)
        yield url
    finally:
        stop_process(proc, timeout=5)
        log.close()
        subprocess.run(["rm", "-rf", temp], check=False)


def test_submit_extract_runs_on_the_cluster(ray_head, tmp_path):
    from cvnet import features, storage
    from cvnet.data.manifest import write_manifest
    from cvnet.models.checkpoints import save_checkpoint
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
               "--store", str(store), "--shard-size", "4", "--address", ray_head, "--wait"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # default tracking
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    shown = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, shown
    job_id = done.stdout.strip().splitlines()[0]
    assert job_id.startswith("cvnet-extract-"), shown
    assert "processed 7 images (3 bad inputs" in done.stdout, shown  # the job's own log, followed
    output = default_output(str(store), str(tmp_path / "model.pt"), storage.file_sha256(str(tmp_path / "model.pt")))
    ids, X = features.read_descriptors(output)
    assert sorted(ids) == ["g0", "g1", "g2", "g3"] and X.shape == (4, 2048)
    assert (store / "mlflow.db").exists()
    # the same submission again reuses the finished job instead of running it twice
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    shown = again.stdout[-3000:] + again.stderr[-3000:]
    assert again.returncode == 0 and again.stdout.strip().splitlines()[0] == job_id, shown
    assert "exists (SUCCEEDED)" in again.stderr, shown

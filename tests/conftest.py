"""Shared fixtures: real services started here and stopped by process id.

- ``s3_server``: moto in server mode (``ThreadedMotoServer``) on loopback; sets the AWS
  environment (endpoint + dummy credentials) for this process and its children.
- ``s3_bucket``: a fresh bucket on that server, as ``s3://name``.
- ``ray_local``: a local Ray cluster (2 CPUs), shared by the session.
- ``mlflow_server``: an ``mlflow server`` process (sqlite backend, artifacts on moto S3).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from pipelines.ray_runtime import LOCAL_RAY_ENV

ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist (``make test`` runs two workers) each worker has its own temporary folder:
# its Ray cluster's session, its jobs' staging folders and its subprocesses stay apart from the
# other worker's. Set before anything asks ``tempfile`` or starts Ray.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _worker_tmp = Path(tempfile.gettempdir()) / f"cvnet-{os.getuid()}-{os.environ['PYTEST_XDIST_WORKER']}"
    _worker_tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(_worker_tmp)
    tempfile.tempdir = None  # recomputed from TMPDIR

# Ray on a small loopback-only machine (see README); set before anything imports ray.
for _key, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "600")
# Ray Train's controller polls its workers every 2 s by default: each start, end and failure
# of the suite's many short runs waits for a poll.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Keep library threads at the core count so concurrent tests do not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadfile --no-loadscope-reorder``): the modules with the most
    ``slow`` tests go first, so that two workers do not end with one long module running alone."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: file order within a module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
            time.sleep(0.3)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group by pid, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto server mode) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE")}
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    })
    os.environ.pop("AWS_PROFILE", None)
    wait_http(endpoint + "/moto-api/")
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields ``s3://<name>``."""
    import boto3
    import s3fs

    name = f"cvnet-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray cluster with 2 CPUs for the session (started by ``ray.init``).

    Started after ``s3_server`` so its workers inherit the S3 endpoint and test credentials
    (a raylet's workers get the environment the raylet started with).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # flaky_fs.register: every worker knows the fault-injecting ``flaky://`` test filesystem
    # (the hook runs before the driver's sys.path reaches the worker: PYTHONPATH finds it)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath},
                          "worker_process_setup_hook": "flaky_fs.register"})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """An ``mlflow server`` process: sqlite backend, artifacts proxied to a moto bucket."""
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    workdir = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_server, TMPDIR=str(workdir),
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
         "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=120)
        yield {"url": url, "bucket": bucket, "pid": proc.pid}
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def workdir():
    """A temporary folder removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="cvnet-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
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

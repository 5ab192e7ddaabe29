"""deploy/ and cluster.yaml: KubeRay manifests, the cron line, the node setup script, Ray's own
validation of the cluster-launcher config."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENTRYPOINT = "python -m jobs.refresh --config configs/refresh.yaml"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def cron_valid(schedule: str) -> bool:
    """A five-field cron expression: ``*``, numbers, ranges, lists and ``/step`` within each field's range."""
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, CRON_FIELDS):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if m is None or (m[4] is not None and int(m[4]) == 0):
                return False
            if m[2] is not None:
                start, end = int(m[2]), int(m[3] or m[2])
                if not low <= start <= end <= high:
                    return False
    return True


def test_cron_validator_rejects_what_cron_rejects():
    assert all(map(cron_valid, ["0 2 * * *", "*/15 0-6 * * 1-5", "5 * 1,15 * 0", "0 0 * 12 7"]))
    assert not any(map(cron_valid, ["0 2 * *", "60 * * * *", "0 24 * * *", "* * 0 * *", "*/0 * * * *",
                                    "5-1 * * * *", "@daily", "0 2 * * * *"]))


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def _cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def check_rayjob_spec(spec: dict) -> None:
    """The refresh's RayJob spec: entrypoint, ephemeral cluster, runtime env without secrets."""
    assert spec["entrypoint"] == ENTRYPOINT
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["backoffLimit"] >= 1  # retries resume the refresh
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    env = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env.values())  # Ray requires string values
    assert env["CVNET_STORE"].startswith("s3://")
    assert env["MLFLOW_TRACKING_URI"].startswith("http")  # a server: the cluster-path rule
    assert env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert not [k for k in env if re.search("SECRET|ACCESS_KEY|TOKEN|PASSWORD", k)]
    cluster = spec["rayClusterSpec"]
    head_image = _cluster_yaml()["docker"]["head_image"]
    assert cluster["rayVersion"] == head_image.split(":")[1].split("-")[0]  # same Ray as cluster.yaml
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert isinstance(head["rayStartParams"], dict)
    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict) and group["template"]["spec"]["containers"][0]["image"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["template"]["spec"]["containers"][0]["image"].endswith("-gpu") for g in gpu)


def test_rayjob_manifest():
    (job,) = _docs("rayjob-refresh.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    check_rayjob_spec(job["spec"])


def test_raycronjob_manifest_runs_the_same_rayjob_nightly():
    (cron,) = _docs("raycronjob-refresh.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert cron_valid(cron["spec"]["schedule"])
    check_rayjob_spec(cron["spec"]["jobTemplate"])  # a RayJob spec, no "spec:" wrapper
    (job,) = _docs("rayjob-refresh.yaml")
    assert cron["spec"]["jobTemplate"] == job["spec"]  # the two manifests stay in step
    text = (DEPLOY / "raycronjob-refresh.yaml").read_text() + (DEPLOY / "README.md").read_text()
    assert "alpha" in text.lower() and "RayCronJob=true" in text


def test_crontab_line_submits_the_refresh_once_a_day():
    from jobs import submit

    lines = [ln for ln in (DEPLOY / "crontab").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    env = dict(ln.split("=", 1) for ln in lines if re.fullmatch(r"[A-Z_]+=\S+", ln))
    assert env["CRON_TZ"] == "UTC" and env["CVNET_STORE"].startswith("s3://")
    (job,) = [ln for ln in lines if ln not in {f"{k}={v}" for k, v in env.items()}]
    fields = job.split(None, 5)
    assert cron_valid(" ".join(fields[:5]))
    words = shlex.split(fields[5])
    at = words.index("submit")
    assert words[at - 1].endswith("cvnet") and words[at + 1] == "refresh"
    period = words[words.index("--period") + 1]
    assert period == "1d" and submit.period_start(period, datetime.now(timezone.utc))
    assert "--wait" in words and words[words.index("--config") + 1] == "configs/refresh.yaml"


# ----------------------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _cluster_yaml()
    validate_config(prepare_config(config))  # raises on any schema error
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["cpu_data"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "gpu" in types["gpu"]["docker"]["worker_image"]


def _node_commands(config: dict) -> dict[str, list[str]]:
    """The setup commands the autoscaler runs on each node type (Ray's merge and override rules)."""
    from ray.autoscaler._private.util import prepare_config

    merged = prepare_config(config)  # adds setup_commands to the head and worker lists
    out = {}
    for name, node in merged["available_node_types"].items():
        if name == merged["head_node_type"]:
            out[name] = merged["head_setup_commands"]
        else:  # a per-type worker_setup_commands replaces the merged global list
            out[name] = node.get("worker_setup_commands", merged["worker_setup_commands"])
    return out


def test_cluster_yaml_installs_cpu_torch_on_cpu_nodes_cuda_torch_on_gpu_nodes():
    config = _cluster_yaml()
    mounts = {remote: (ROOT / local).resolve() for remote, local in config["file_mounts"].items()}
    assert mounts["/home/ray/cvnet"] == ROOT  # the checkout is on every node
    assert {".venv", ".git", "cvnet-store"} <= set(config["rsync_exclude"])
    for node_type, commands in _node_commands(config).items():
        setups = [shlex.split(c) for c in commands if "setup-node.sh" in c]
        assert len(setups) == 1, (node_type, commands)
        (_, script, build, project), = setups
        assert Path(script.replace("/home/ray/cvnet", str(ROOT))) == DEPLOY / "setup-node.sh"
        assert project == "/home/ray/cvnet"
        gpu_node = "gpu" in config["available_node_types"][node_type].get("docker", {}).get("worker_image", "")
        assert build == ("gpu" if gpu_node else "cpu"), node_type


@pytest.fixture
def fake_pip(tmp_path):
    """A ``pip`` first on PATH that records its arguments instead of installing."""
    log = tmp_path / "pip.log"
    pip = tmp_path / "bin" / "pip"
    pip.parent.mkdir()
    pip.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    pip.chmod(0o755)
    env = dict(os.environ, PATH=f"{pip.parent}:{os.environ['PATH']}")
    env.pop("TORCH_PIN", None)
    return env, log


@pytest.mark.parametrize("build", ["cpu", "gpu"])
def test_setup_node_installs_torch_build_then_requirements_then_project(fake_pip, build):
    env, log = fake_pip
    done = subprocess.run(["bash", str(DEPLOY / "setup-node.sh"), build, "/srv/cvnet"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    torch, requirements, project = log.read_text().splitlines()
    assert torch.startswith("install -q torch==2.13.*")
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    assert (cpu_index in torch) == (build == "cpu")
    assert requirements == "install -q -r /srv/cvnet/requirements.txt"
    assert project == "install -q --no-deps -e /srv/cvnet"  # keeps the torch build chosen above


def test_setup_node_refuses_an_unknown_build(fake_pip):
    env, log = fake_pip
    done = subprocess.run(["bash", str(DEPLOY / "setup-node.sh"), "tpu"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr and not log.exists()


def test_dockerfile_uses_the_cluster_ray_image_and_the_setup_script():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M)[1]
    assert base == _cluster_yaml()["docker"]["head_image"]
    assert "RUN bash /home/ray/cvnet/deploy/setup-node.sh ${TORCH_BUILD} /home/ray/cvnet" in text
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "cvnet-store"} <= set(ignored)

"""Starting or attaching to Ray with the settings this project relies on."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Environment that keeps a local Ray on loopback and independent of leftover auth state
# (see README "Ray on small machines"). Passed to every worker too.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# Variables forwarded to Ray workers when set in the driver (endpoints, tracking). Credentials
# are not forwarded: workers resolve them from the standard AWS chain on their own node (a local
# cluster inherits the driver's environment), so they never travel in a runtime_env.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "CVNET_STORE",
)


def worker_env() -> dict[str, str]:
    """Environment variables to hand to Ray workers (job-level runtime_env)."""
    env = dict(LOCAL_RAY_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return env


def use_local_ray_env(address: str | None = None) -> None:
    """Keep a Ray that this process will start on loopback (``LOCAL_RAY_ENV``). Ray reads these
    settings when it is imported, so call this first; a process attaching to a cluster
    (``address`` / ``RAY_ADDRESS``) keeps the cluster's own networking."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``), else start a local Ray cluster.

    Idempotent: does nothing when Ray is already initialised in this process.
    """
    use_local_ray_env(address)
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": True}
    if address is None:
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls;
        # without it the driver log fills with "Failed to query ... actor state" warnings.
        kwargs.update(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
        log.info("starting a local Ray cluster")
    else:
        log.info("attaching to Ray at %s", address)
    ray.init(address=address, **kwargs)

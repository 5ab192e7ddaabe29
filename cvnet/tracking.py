"""MLflow helpers: where runs go, one run per job, and parameters that never carry secrets.

Default tracking (no ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``): a SQLite file inside a local
store (``<store>/mlflow.db``, artifacts in ``<store>/mlflow-artifacts``); for a remote store, a
SQLite file in the working directory. A cluster points ``MLFLOW_TRACKING_URI`` at an
``mlflow server`` whose artifact store is the same bucket.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from cvnet.storage import is_remote, redact

_SECRET_KEYS = ("secret", "password", "token", "access_key", "credential")


def resolve_tracking_uri(store: str, tracking_uri: str | None = None) -> str:
    """The MLflow tracking URI for a job writing to ``store``."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    root = os.path.abspath("." if is_remote(store) else store)
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested config into ``a.b=value`` strings, dropping secret-looking keys."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if any(s in str(key).lower() for s in _SECRET_KEYS):
            continue
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            out[name] = redact(str(value))[:500]
    return out


def _experiment_id(mlflow: Any, name: str, tracking_uri: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        db_dir = os.path.dirname(tracking_uri[len("sqlite:///"):])
        artifact_location = "file://" + os.path.join(db_dir, "mlflow-artifacts")
    return mlflow.create_experiment(name, artifact_location=artifact_location)


@contextlib.contextmanager
def mlflow_run(
    experiment: str,
    tracking_uri: str,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Start (or resume by ``run_id``) one MLflow run; yields the active run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = None if run_id else _experiment_id(mlflow, experiment, tracking_uri)
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name,
                          tags=dict(tags or {})) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        yield run


def register_model(name: str, source: str, run_id: str,
                   tags: Mapping[str, Any] | None = None) -> str:
    """Register ``source`` (an artifact URI of run ``run_id``) as a new version of ``name``.

    Works for any artifact folder (no MLmodel needed). Returns the version number.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    version = client.create_model_version(name, source, run_id=run_id,
                                          tags={k: str(v) for k, v in (tags or {}).items()})
    return str(version.version)

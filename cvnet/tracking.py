"""MLflow helpers: where runs go, one run per job, and parameters that never carry secrets.

Default tracking (no ``--tracking-uri`` / ``MLFLOW_TRACKING_URI``): a SQLite file inside a local
store (``<store>/mlflow.db``, artifacts in ``<store>/mlflow-artifacts``); for a remote store, a
SQLite file in the working directory. A cluster points ``MLFLOW_TRACKING_URI`` at an
``mlflow server`` whose artifact store is the same bucket: a job attached to a cluster
(``--address`` / ``RAY_ADDRESS``, which a Ray job's driver always has) that writes to a remote
store with a local tracking URI fails at once (:func:`resolve_tracking_uri`), since workers on
other nodes could not see that file.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from cvnet.storage import is_remote, redact

_SECRET_KEYS = ("secret", "password", "token", "access_key", "credential")


_LOCAL_SCHEMES = ("sqlite", "file", "")


class TrackingConfigError(ValueError):
    """A tracking URI that cannot work for this job; the message names the setting to give."""


def is_local_tracking_uri(uri: str) -> bool:
    """A tracking URI that only this machine can see (an SQLite file, a folder)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return scheme.split("+", 1)[0] in _LOCAL_SCHEMES


def resolve_tracking_uri(store: str, tracking_uri: str | None = None, address: str | None = None) -> str:
    """The MLflow tracking URI for a job writing to ``store``: ``tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else a SQLite file (see the module docstring).

    Raises :class:`TrackingConfigError` for a job attached to a cluster (``address`` or
    ``RAY_ADDRESS``) with a remote store and a local tracking URI.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        root = os.path.abspath("." if is_remote(store) else store)
        os.makedirs(root, exist_ok=True)
        uri = f"sqlite:///{root}/mlflow.db"
    if (address or os.environ.get("RAY_ADDRESS")) and is_remote(store) and is_local_tracking_uri(uri):
        raise TrackingConfigError(
            f"tracking URI {redact(uri)} is a local file, but this job runs on a Ray cluster with the "
            f"remote store {redact(store)}: workers on other nodes cannot reach it; give --tracking-uri "
            "(or set MLFLOW_TRACKING_URI) to an mlflow server, e.g. http://mlflow.internal:5000")
    return uri


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

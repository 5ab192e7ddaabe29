"""What every pipeline job does around its work: the S3 endpoint, the tracking URI (checked
before Ray starts, so a cluster job with a remote store and a local tracking URI fails at once),
Ray, one MLflow run with the config as params, and the table versions it read and wrote."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel


@contextmanager
def pipeline_run(cfg: BaseModel, run_name: str, ray: bool = True) -> Iterator[None]:
    """Set up for a job configured by ``cfg`` (its ``store``, ``tracking_uri``, ``experiment`` and,
    when it has them, ``endpoint_url`` / ``address``) and hold its MLflow run open."""
    from cvnet import storage
    from cvnet.tracking import mlflow_run, resolve_tracking_uri
    from pipelines.ray_runtime import init_ray

    endpoint, address = getattr(cfg, "endpoint_url", None), getattr(cfg, "address", None)
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    tracking_uri = resolve_tracking_uri(cfg.store or storage.default_store(), cfg.tracking_uri, address)
    if ray:
        init_ray(address)
    with mlflow_run(cfg.experiment, tracking_uri, run_name=run_name, params=cfg.model_dump()):
        yield


def log_tables(read: Mapping[str, int], written: Mapping[str, int], **uris: Any) -> None:
    """Log the versions of the tables a job read and wrote (``<table>_version_read`` / ``_written``)
    and the URIs of its outputs (``<name>_uri``, credentials redacted)."""
    import mlflow

    from cvnet.storage import redact

    mlflow.log_params({f"{name}_version_read": v for name, v in read.items()}
                      | {f"{name}_version_written": v for name, v in written.items()}
                      | {f"{name}_uri": redact(str(uri)) for name, uri in uris.items()})

"""``cvnet refresh``: the scheduled loop on the current manifests, configured by
:class:`cvnet.config.RefreshConfig` (``configs/refresh.yaml``).

Extraction of the new images with the champion global model, incremental re-mining, stage-2
fine-tuning from the champion re-ranker on the new hard-negatives version, evaluation of the
candidate and the champion on a pinned benchmark, registration, and the gate (the candidate
becomes ``challenger``; ``champion`` moves only when it wins by ``promote.min_gain``). Resumable,
one at a time per store, and quick when there is nothing new (:mod:`pipelines.refresh`).
Exit codes: 0 done or nothing to do, 3 another refresh holds the store's refresh lease.
"""
from __future__ import annotations

import argparse
import os
import sys

from jobs.cli import entrypoint

HELP = "refresh: extract new images, re-mine, retrain stage 2, evaluate, gate the candidate"
LEASE_HELD = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvnet.config import RefreshConfig
    from jobs.config import add_config_arguments

    add_config_arguments(parser, RefreshConfig)


def run(args: argparse.Namespace) -> int:
    from cvnet.config import RefreshConfig
    from jobs.config import config_from_args

    cfg = config_from_args(RefreshConfig, args)
    if cfg.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint_url
    from cvnet import storage
    from cvnet.tables import LeaseHeld
    from cvnet.tracking import resolve_tracking_uri
    from pipelines.refresh import run_refresh

    store = cfg.store or storage.default_store()
    tracking_uri = resolve_tracking_uri(store, cfg.tracking_uri, cfg.address)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # Ray workers resolve models:/ URIs there
    try:
        result = run_refresh(cfg, tracking_uri)
    except LeaseHeld as err:
        print(f"refresh refused: another refresh is running: {err}", file=sys.stderr)
        return LEASE_HELD
    if result.resumed:
        print(f"resumed after the steps {', '.join(result.resumed)}")
    print(result.message)
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

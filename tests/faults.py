"""Faults that the tests inject into Ray worker processes (the code under test has no hook).

``python -m tests.faults STEP MARKER ADDRESS <cvnet args...>`` runs a cvnet job as a Ray driver
attached to the cluster at ADDRESS with :func:`fail_once_at_step` as the job's
``worker_process_setup_hook``: in each of the job's worker processes it wraps both stages' step
functions (``pipelines.train_global.train_step``, ``pipelines.train_rerank.train_step``) so that
rank 0 raises :class:`InjectedFault` when it is about to run step STEP. The
first worker to get there creates the file MARKER (atomically, ``O_EXCL``), so the fault fires
once per MARKER and the restarted workers train on; the file tells the test it happened.
"""
from __future__ import annotations

import os
import sys

STEP_ENV = "CVNET_TEST_FAULT_STEP"
MARKER_ENV = "CVNET_TEST_FAULT_MARKER"


class InjectedFault(RuntimeError):
    """The fault a test injected."""


def _claim(marker: str, step: int) -> bool:
    """True for the first caller only (the marker file did not exist and now does)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"step {step} pid {os.getpid()}\n")
    return True


def _failing(real_step, step: int, marker: str):
    import ray.train

    def train_step(state, *args, **kwargs):
        if (state.step == step and ray.train.get_context().get_world_rank() == 0
                and _claim(marker, state.step)):
            raise InjectedFault(f"injected fault at step {state.step}")
        return real_step(state, *args, **kwargs)

    return train_step


def fail_once_at_step() -> None:
    """Worker setup hook: make rank 0's ``train_step`` (either stage) raise once at step
    ``$CVNET_TEST_FAULT_STEP``."""
    step, marker = os.environ.get(STEP_ENV), os.environ.get(MARKER_ENV)
    if not step or not marker:
        return
    import pipelines.train_global as train_global
    import pipelines.train_rerank as train_rerank

    for module in (train_global, train_rerank):
        module.train_step = _failing(module.train_step, int(step), marker)


def main(argv: list[str]) -> int:
    step, marker, address, *cvnet_args = argv
    import ray

    from jobs.cli import main as cvnet
    from pipelines.ray_runtime import worker_env

    # the hook is imported before the driver's sys.path reaches the worker: PYTHONPATH does
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(address=address, log_to_driver=False, runtime_env={
        "worker_process_setup_hook": "tests.faults.fail_once_at_step",
        "env_vars": {**worker_env(), "PYTHONPATH": root, STEP_ENV: step, MARKER_ENV: marker}})
    return cvnet(cvnet_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``cvnet submit <job> <job args...> --address URL [--wait]``: run any cvnet job on a Ray cluster.

The job goes through the Ray Jobs API: the working directory (this checkout, without ``.venv``,
``.git`` and the local store) is uploaded, the entrypoint is ``python -m jobs.<job> <args>``, and
the endpoint / tracking variables of this shell are forwarded (never credentials: the cluster's
nodes resolve those from their own AWS chain). The submission id is derived from the job and
its arguments, so submitting the same job twice does not run it twice: a running or finished
job is reused; a failed or stopped one is replaced (the jobs resume from their commits).

With ``--period P`` (``30m``, ``6h``, ``1d``, ``1w``: N minutes / hours / days / weeks) the id
also names the period, in UTC, that the submission falls in (periods are multiples of P since
1970-01-01 00:00 UTC; weeks start on Mondays): a scheduler that resubmits within one period
gets the existing job back, and the first submission of the next period runs anew.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from jobs.cli import COMMANDS, entrypoint

HELP = "submit any cvnet job to a Ray cluster through the Ray Jobs API"

ROOT = Path(__file__).resolve().parent.parent
UPLOAD_EXCLUDES = [".venv/", ".git/", "cvnet-store/", "tmp/", "bench/results/", "**/__pycache__/",
                   "*.egg-info/", ".pytest_cache/"]
TERMINAL_OK = "SUCCEEDED"
PERIOD = re.compile(r"([1-9]\d*)([mhdw])")
UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MONDAY = 4 * 86400  # 1970-01-01 was a Thursday


def period_start(period: str, now: datetime) -> datetime:
    """The UTC start of the period of length ``period`` (``6h``, ``1d``, ...) holding ``now``."""
    match = PERIOD.fullmatch(period)
    if match is None:
        raise ValueError(f"period {period!r}: expected a count and a unit m, h, d or w (30m, 6h, 1d, 1w)")
    size = int(match[1]) * UNIT_SECONDS[match[2]]
    offset = MONDAY if match[2] == "w" else 0
    moment = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
    start = (int(moment.timestamp()) - offset) // size * size + offset
    return datetime.fromtimestamp(start, timezone.utc)


def _period(value: str) -> str:
    try:
        period_start(value, datetime.now(timezone.utc))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="dashboard URL of the cluster (default: RAY_API_SERVER_ADDRESS / RAY_ADDRESS)")
    parser.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's status")
    parser.add_argument("--submission-id", default=None, help="override the deterministic id")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for the job (AWS_ENDPOINT_URL)")
    parser.add_argument("--working-dir", default=str(ROOT), help="folder uploaded as the job's working dir")
    parser.add_argument("--period", type=_period, default=None,
                        help="run at most once per period (30m, 6h, 1d, 1w; UTC): the id names the period")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", choices=[name for name in COMMANDS if name != "submit"])
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments of the job")
    _options(parser)


def split_args(args: argparse.Namespace) -> argparse.Namespace:
    """Take this command's own options out of the job's arguments (they may come after ``job``)."""
    own = argparse.ArgumentParser(add_help=False)
    _options(own)
    # values already on the namespace (given before ``job``) stand unless repeated after it
    parsed, rest = own.parse_known_args(args.job_args, namespace=argparse.Namespace(**vars(args)))
    parsed.job_args = rest
    return parsed


def submission_id(job: str, job_args: list[str], period: str | None = None,
                  now: datetime | None = None) -> str:
    """A deterministic id for a job and its arguments (``cvnet-extract-1a2b3c4d5e6f``), with
    ``period`` the period holding ``now`` (default: the current time) appended
    (``cvnet-refresh-1a2b3c4d5e6f-1d-20261201T0000Z``)."""
    digest = hashlib.sha256(json.dumps([job, job_args]).encode()).hexdigest()[:12]
    if period is None:
        return f"cvnet-{job}-{digest}"
    start = period_start(period, now or datetime.now(timezone.utc))
    return f"cvnet-{job}-{digest}-{period}-{start:%Y%m%dT%H%MZ}"


def runtime_env(working_dir: str, endpoint_url: str | None) -> dict:
    """Working dir upload (without local-only folders) and the forwarded environment."""
    from pipelines.ray_runtime import worker_env

    env = worker_env()
    # the job's driver calls init_ray, which sets the same variables again: let Ray merge them
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    return {"working_dir": working_dir, "excludes": UPLOAD_EXCLUDES, "env_vars": env}


def _follow(client, job_id: str) -> str:
    """Print the job's logs as they come, then any tail the stream missed at the job's end;
    returns the job's final status."""
    import asyncio

    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()
            printed += len(lines)

    asyncio.run(tail())
    status = _wait_terminal(client, job_id)
    sys.stdout.write(client.get_job_logs(job_id)[printed:])
    sys.stdout.flush()
    return status


def _submit(client, retry_s: float = 60.0, **kwargs) -> None:
    """``submit_job``, retried while a fresh head's job agent is still starting."""
    import time

    deadline = time.monotonic() + retry_s
    while True:
        try:
            client.submit_job(**kwargs)
            return
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _wait_terminal(client, job_id: str) -> str:
    import time

    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(1.0)
    return str(status.value)


def run(args: argparse.Namespace, now: datetime | None = None) -> int:
    """Submit (or find again) the job; ``now`` places a ``--period`` submission in time
    (default: the current time; tests pass other times)."""
    import logging

    from ray.job_submission import JobSubmissionClient

    from cvnet.storage import redact

    log = logging.getLogger("cvnet.submit")
    opts = split_args(args)
    address = opts.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SystemExit("cvnet submit: no cluster address (--address or RAY_ADDRESS)")
    job_id = opts.submission_id or submission_id(opts.job, opts.job_args, opts.period, now)
    client = JobSubmissionClient(address)
    existing = {job.submission_id: job for job in client.list_jobs() if job.submission_id}
    if job_id in existing and existing[job_id].status.is_terminal() \
            and existing[job_id].status.value != TERMINAL_OK:
        log.info("job %s ended %s before; replacing it", job_id, existing[job_id].status.value)
        client.delete_job(job_id)
        existing.pop(job_id)
    if job_id in existing:
        log.info("job %s exists (%s); not submitting again", job_id, existing[job_id].status.value)
    else:
        command = shlex.join(["python", "-m", COMMANDS[opts.job], *opts.job_args])
        _submit(client, entrypoint=command, submission_id=job_id,
                runtime_env=runtime_env(opts.working_dir, opts.endpoint_url))
        log.info("submitted %s: %s", job_id, redact(command))
    print(job_id)
    if not opts.wait:
        return 0
    status = _follow(client, job_id)
    log.info("job %s finished: %s", job_id, status)
    return 0 if status == TERMINAL_OK else 1


if __name__ == "__main__":
    sys.exit(entrypoint(__name__))

"""Finding a local Ray node's worker processes (for fault tests that kill or count them)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any


def raylet_pid(node) -> int:
    """The raylet pid of a ``ray._private.node.Node`` (``ray._private.worker._global_node``)."""
    return node.all_processes["raylet"][0].process.pid


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat") as handle:
            pid = int(handle.read().rsplit(")", 1)[1].split()[1])
    return False


def actor_pids(raylet: int, name: bytes) -> list[int]:
    """Pids of the actor processes whose command line names ``name`` under raylet ``raylet``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if name in Path(f"/proc/{entry}/cmdline").read_bytes() and descends_from(int(entry), raylet):
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; ``TimeoutError(what)`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def table_version(uri: str) -> int:
    """The committed version of the table at ``uri`` (0 when none yet)."""
    from cvnet.tables import Table

    try:
        return Table.open(uri).version
    except FileNotFoundError:
        return 0


class JobThread(threading.Thread):
    """A job run in a thread: :meth:`result` returns what it returned or raises what it raised,
    so a test that fails on the job shows the job's own error."""

    def __init__(self, job, *args: Any) -> None:
        super().__init__(daemon=True)
        self._job, self._args = job, args
        self._result: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = self._job(*self._args)
        except BaseException as error:  # re-raised in the test's thread by result()
            self._error = error

    def result(self) -> Any:
        if self.is_alive():
            raise TimeoutError(f"{self._job.__name__} is still running")
        if self._error is not None:
            raise self._error
        return self._result


def kill_actors_mid_run(ray, name: bytes, runner: threading.Thread) -> set[int]:
    """SIGKILL every actor process called ``name`` of the local Ray while ``runner`` (the job's
    thread) is alive; returns the pids of the actors that replaced them (empty if none came
    before the job ended)."""
    raylet = raylet_pid(ray._private.worker._global_node)
    wait_for(lambda: actor_pids(raylet, name) or not runner.is_alive(), 60, f"no {name.decode()} actor")
    killed = actor_pids(raylet, name)
    assert killed and runner.is_alive(), "the kill must happen while the job runs"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: set(actor_pids(raylet, name)) - set(killed) or not runner.is_alive(), 120, "no restart")
    return set(actor_pids(raylet, name)) - set(killed)

"""Finding a local Ray node's worker processes (for fault tests that kill or count them)."""
from __future__ import annotations

import os
from pathlib import Path


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

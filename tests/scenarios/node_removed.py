"""A node removed mid-extraction on a ``ray.cluster_utils.Cluster`` (run by
tests/test_extract_pipeline.py in its own process, since it starts its own Ray).

The head has no CPUs, so the actor and the decode tasks run on the worker node; once a shard
is committed that node is removed and a replacement joins (as an autoscaler would add one).
Prints ``key=value`` lines the test asserts on.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: ray_procs, flaky_fs

from pipelines.ray_runtime import LOCAL_RAY_ENV  # noqa: E402

os.environ.update(LOCAL_RAY_ENV)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from cvnet import features, storage  # noqa: E402
from cvnet.config import ExtractConfig  # noqa: E402
from cvnet.tables import Table  # noqa: E402
from pipelines.extract import run_extract  # noqa: E402
from ray_procs import JobThread, actor_pids, raylet_pid  # noqa: E402


def committed(output: str) -> int:
    total = 0
    for name in (features.FEATURES, features.BAD_INPUTS):
        try:
            total += Table.open(storage.join(output, name)).num_rows()
        except FileNotFoundError:
            pass
    return total


def main(manifest: str, model: str, output: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=2)
    tests = str(Path(__file__).resolve().parent.parent)  # flaky:// reads keep the run going
    ray.init(address=cluster.address, runtime_env={
        "env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": tests}, "worker_process_setup_hook": "flaky_fs.register"})
    cfg = ExtractConfig(manifest=manifest, model=model, output=output, shard_size=1, part_rows=1, read_rows=1,
                        batch_size=1, transient_retries=4, max_bad_fraction=1.0)
    runner = JobThread(run_extract, cfg)
    runner.start()
    deadline = time.monotonic() + 300
    while committed(output) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = committed(output)
    cluster.remove_node(doomed, allow_graceful=False)
    replacement = cluster.add_node(num_cpus=2)
    runner.join(timeout=400)
    deadline = time.monotonic() + 120  # the GCS marks a killed node dead after its health checks
    while time.monotonic() < deadline:
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        if not alive.get(doomed.node_id, True):
            break
        time.sleep(0.5)
    print(f"committed_before_removal={before}")
    print(f"removed_node_alive={alive.get(doomed.node_id)}")
    print(f"actor_restarted_on_new_node={bool(actor_pids(raylet_pid(replacement), b'ExtractActor'))}")
    try:
        print(f"images={runner.result().images}")  # raises the job's error, if any
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])

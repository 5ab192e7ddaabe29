"""`cvnet mine` on a real local Ray: exact against brute force (1 and 2 actors, gallery blocks,
fp16 recall), incremental == full with fewer pairs, crash states, an actor and a driver killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvnet import features, mining
from cvnet.config import MineConfig
from cvnet.search import Descriptors, TopK, recall_at_k
from cvnet.tables import Table, TableWriter
from mine_data import clustered, write_features
from pipelines.mine import MineError, put_gallery, run_mine
from ray_procs import JobThread, kill_actors_mid_run, table_version, wait_for
from test_search import assert_same, reference

ROOT = Path(__file__).resolve().parent.parent
KEEP, K = 32, 10
N, N_NEW, BIG = 300, 100, 90  # BIG: one landmark larger than keep and than a gallery block below


def make_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    landmarks = rng.integers(0, n // 8, n)
    landmarks[rng.choice(n, BIG * n // (N + N_NEW), replace=False)] = 999
    landmarks[(rng.random(n) < 0.05) & (landmarks != 999)] = -1
    ids = np.array([f"im{i:04d}" for i in rng.permutation(n)])
    return ids, clustered(n, landmarks, seed), landmarks


@pytest.fixture(scope="module")
def data():
    return make_set(N + N_NEW)


def features_at(tmp_path: Path, data, n: int) -> str:
    ids, X, lm = data
    folder = tmp_path / "features"
    write_features(folder, ids[:n], X[:n], lm[:n])
    return str(folder)


def expected(data, n: int, keep: int = KEEP) -> TopK:
    ids, X, lm = data
    everyone = Descriptors(X[:n], ids[:n], lm[:n])
    return reference(everyone, everyone, keep)


def mined(output: str) -> TopK:
    """The output table as a TopK sorted by image id (padding restored)."""
    rows = Table.open(os.path.join(output, mining.TABLE)).read().sort_by("image_id")
    return mining.stored_topk(rows.column("image_id").to_pylist(), rows.column("negative_ids").to_pylist(),
                              rows.column("negative_scores").to_pylist(), KEEP)


def by_id(result: TopK) -> TopK:
    order = np.argsort(result.query_ids)
    return TopK(result.query_ids[order], result.ids[order], result.scores[order])


def config(features_uri: str, output: str, **kw) -> MineConfig:
    return MineConfig(**dict(dict(features=features_uri, output=output, keep=KEEP, k=K, query_rows=64,
                                  shard_size=128, actor_cpus=1), **kw))


@pytest.mark.parametrize("actors,block_rows", [(1, 1 << 20), (2, 64)])
def test_mine_equals_brute_force(ray_local, data, tmp_path, actors, block_rows):
    uri = features_at(tmp_path, data, N + N_NEW)
    assert (data[2] == 999).sum() == BIG > max(KEEP, min(block_rows, 64))  # the big class spans blocks
    result = run_mine(config(uri, str(tmp_path / "out"), num_actors=actors, gallery_block_rows=block_rows))
    assert result.rows == N + N_NEW and result.pairs == result.full_pairs == (N + N_NEW) ** 2
    assert_same(mined(result.output), by_id(expected(data, N + N_NEW)))
    assert run_mine(config(uri, str(tmp_path / "out"))).rows == 0  # a rerun finds everything done


def test_fp16_tiles_recall(ray_local, data, tmp_path):
    uri = features_at(tmp_path, data, N + N_NEW)
    result = run_mine(config(uri, str(tmp_path / "out"), precision="fp16"))
    recall = recall_at_k(mined(result.output), by_id(expected(data, N + N_NEW)), K)
    print(f"fp16 tiles: recall@{K} = {recall:.4f}")
    assert recall >= 0.95


def test_landmarks_from_a_manifest(ray_local, data, tmp_path):
    import pyarrow as pa

    from cvnet.data.manifest import read_manifest, write_manifest

    ids, X, lm = data
    uri = features_at(tmp_path, data, N)
    relabelled = np.where(np.arange(N) % 3 == 0, 500, lm[:N])  # the manifest's landmarks, not the table's
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(pa.table({"image_id": list(ids[:N]), "uri": [f"{uri}/img/{i}.jpg" for i in ids[:N]],
                             "landmark_id": pa.array([None if v < 0 else int(v) for v in relabelled], pa.int64()),
                             "split": ["train"] * N}), manifest)
    result = run_mine(config(uri, str(tmp_path / "out"), manifest=manifest))
    assert_same(mined(result.output), by_id(expected((ids, X, relabelled), N)))
    short = str(tmp_path / "short.parquet")  # a manifest that lacks two of the images
    rows = read_manifest(manifest)
    write_manifest(rows.slice(2), short)
    dropped = sorted(rows.column("image_id")[:2].to_pylist())
    with pytest.raises(MineError, match=rf"no landmark for \['{dropped[0]}', '{dropped[1]}'\] \(2 images"):
        run_mine(config(uri, str(tmp_path / "out2"), manifest=short))


def test_incremental_equals_full_with_fewer_pairs(ray_local, data, tmp_path):
    ids, X, lm = data
    uri = features_at(tmp_path, data, N)
    out = str(tmp_path / "out")
    first = run_mine(config(uri, out))
    assert_same(mined(out), by_id(expected(data, N)))
    write_features(uri, ids[N:], X[N:], lm[N:])  # the features grew
    moved = ids[5]  # and one old image changed landmark (re-extracted under the same URI)
    changed = np.array(lm[:N + N_NEW])
    changed[5] = 998
    write_features(uri, [moved], X[5:6], [998], replace=True)
    again = run_mine(config(uri, out))
    grown = (ids, X, changed)
    assert_same(mined(out), by_id(expected(grown, N + N_NEW)))
    plan = again.plan
    delta = N_NEW + 1
    assert [len(d) for _, d in plan.incremental.values()] == [delta]
    incremental = plan.rows - len(plan.full)
    assert again.rows == N + N_NEW and len(plan.full) >= N_NEW + 1 and incremental >= N // 2
    assert again.pairs == len(plan.full) * (N + N_NEW) + incremental * delta
    assert again.pairs < 0.6 * again.full_pairs
    print(f"incremental: {again.pairs} pairs vs {again.full_pairs} for a full re-mine "
          f"({incremental} rows against the {delta} new/changed, {len(plan.full)} in full)")
    full = run_mine(config(uri, str(tmp_path / "full")))
    np.testing.assert_array_equal(mined(out).ids, mined(str(tmp_path / "full")).ids)
    np.testing.assert_array_equal(mined(out).scores, mined(str(tmp_path / "full")).scores)
    assert full.pairs == full.full_pairs and first.plan.version < again.plan.version


def test_crash_after_deleting_updated_rows_is_redone_in_full(ray_local, data, tmp_path):
    """The state a crash between an updated row's delete and its commit leaves: those keys are
    absent; the rerun searches them in full (their stored lists are gone) and ends exact."""
    ids, X, lm = data
    uri = features_at(tmp_path, data, N)
    out = str(tmp_path / "out")
    run_mine(config(uri, out))
    write_features(uri, ids[N:], X[N:], lm[N:])
    table = Table.open(os.path.join(out, mining.TABLE))
    lost = list(ids[:40])
    TableWriter(table, None).delete(lost)
    again = run_mine(config(uri, out))
    assert set(ids[r] for r in again.plan.full) >= set(lost)
    assert_same(mined(out), by_id(expected(data, N + N_NEW)))


def test_gallery_blocks_are_read_only_shared_views(ray_local, data, tmp_path):
    import ray

    uri = features_at(tmp_path, data, N)
    table = features.open_features(uri)
    gallery = put_gallery(table, table.read(["image_id"]).column(0).combine_chunks(), data[2][:N], 128, {})

    @ray.remote(num_cpus=0)
    def inspect(blocks):
        arrays = [ray.get(ref) for ref in blocks]
        return [(a.flags.writeable, a.flags.owndata, a.shape) for a in arrays]

    seen = ray.get(inspect.remote(gallery.blocks))
    assert [s[2][0] for s in seen] == [128, 128, N - 256]
    assert not any(writeable or owndata for writeable, owndata, _ in seen)  # views of the object store


@pytest.mark.slow
def test_actor_killed_mid_run_leaves_every_image_once(ray_local, data, tmp_path):
    uri = features_at(tmp_path, data, N + N_NEW)
    out = str(tmp_path / "out")
    cfg = config(uri, out, query_rows=2, shard_size=2)
    runner = JobThread(run_mine, cfg)
    runner.start()
    try:
        wait_for(lambda: table_version(os.path.join(out, mining.TABLE)) >= 3, 120, "nothing committed")
        restarted = kill_actors_mid_run(ray_local, b"MineActor", runner)
    finally:
        runner.join(timeout=300)
    runner.result()  # the job ended without an error (raised here if it had one)
    assert restarted  # a new actor served the rest
    rows = Table.open(os.path.join(out, mining.TABLE)).read(["image_id"]).column(0).to_pylist()
    assert len(rows) == len(set(rows)) == N + N_NEW
    assert_same(mined(out), by_id(expected(data, N + N_NEW)))


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(ray_local, data, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    uri = features_at(tmp_path, data, N + N_NEW)
    out = str(tmp_path / "out")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--features", uri, "--output", out, "--keep", str(KEEP), "--query-rows", "2", "--shard-size", "2",
            "--tracking-uri", tracking]
    driver = subprocess.Popen([sys.executable, "-m", "jobs.mine", *args,
                               "--address", ray_local.get_runtime_context().gcs_address],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    table_uri = os.path.join(out, mining.TABLE)
    try:
        wait_for(lambda: table_version(table_uri) >= 3, 180, "nothing committed")
        assert driver.poll() is None, "the driver must be killed mid-run"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = Table.open(table_uri).num_rows()
    assert 1 <= before < N + N_NEW
    before_tracking = os.environ.get("MLFLOW_TRACKING_URI")
    from jobs.cli import build_parser

    parsed = build_parser().parse_args(["mine", *args, "query_rows=64", "shard_size=128"])  # same output
    try:
        assert parsed._run(parsed) == 0
    finally:
        mlflow.set_tracking_uri(before_tracking)
    assert_same(mined(out), by_id(expected(data, N + N_NEW)))
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    run = next(r for r in runs if r.info.status == "FINISHED")
    assert run.data.metrics["rows"] == N + N_NEW - before and run.data.metrics["pairs_per_s"] > 0
    assert int(run.data.params["features_version_read"]) == features.open_features(uri).version


@pytest.mark.gpu
def test_gpu_actors_equal_brute_force(ray_local, data, tmp_path):
    import torch

    if not torch.cuda.is_available() or not ray_local.cluster_resources().get("GPU"):
        pytest.skip("needs a CUDA device visible to Ray")
    uri = features_at(tmp_path, data, N + N_NEW)
    result = run_mine(config(uri, str(tmp_path / "out"), actor_gpus=0.5, gallery_block_rows=128))
    assert_same(mined(result.output), by_id(expected(data, N + N_NEW)))  # the same ids and order on CUDA

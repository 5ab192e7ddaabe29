"""Extraction on a real local Ray: exactness, bad inputs, resume, actor and driver faults, S3."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvnet import features, storage
from cvnet.data.manifest import tar_member_uri, write_manifest
from cvnet.models.checkpoints import load_model, save_checkpoint
from cvnet.models.cvnet import CVNet
from cvnet.models.rerank import RerankFeatures
from cvnet.models.synthetic_weights import synthetic_state_dict
from cvnet.storage import CommitError
from pipelines.extract import ExtractConfig, ExtractError, run_extract

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(64, 64), (64, 80), (96, 72), (72, 96)]
N_GOOD = 8
IN_TAR = ("g0", "g1")  # read as members of img/pack.tar
BAD = {"corrupt": ("decode", "not a decodable image"), "empty": ("decode", "empty file"),
       "missing": ("read", "file not found")}
N_ROWS = N_GOOD + len(BAD)


def n_shards(shard_size: int) -> int:
    return -(-N_ROWS // shard_size)


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random scene (JPEG-friendly): blurred noise plus a few rectangles."""
    im = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (7, 7), 0)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        cv2.rectangle(im, (x, y), (x + 8, y + 8), [int(c) for c in rng.integers(0, 255, 3)], -1)
    return im


def write_set(folder: Path, n_good: int, uri_prefix: str | None = None) -> list[dict]:
    """Good JPEGs (two as tar members) + corrupt, empty and missing entries; returns manifest rows."""
    rng = np.random.default_rng(7)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    prefix = uri_prefix or str(folder / "img")
    rows = []
    for i in range(n_good):
        cv2.imwrite(str(folder / "img" / f"g{i}.jpg"), _image(rng, *SIZES[i % len(SIZES)]))
        uri = f"{prefix}/g{i}.jpg"
        if f"g{i}" in IN_TAR:
            uri = tar_member_uri(f"{prefix}/pack.tar", f"g{i}.jpg")
        rows.append({"image_id": f"g{i}", "uri": uri, "landmark_id": i % 3, "split": "train"})
    with tarfile.open(folder / "img" / "pack.tar", "w") as tar:
        for name in IN_TAR:
            tar.add(folder / "img" / f"{name}.jpg", arcname=f"{name}.jpg")
    (folder / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (folder / "img" / "empty.jpg").write_bytes(b"")
    for name in BAD:
        rows.insert(len(rows) // 2, {"image_id": name, "uri": f"{prefix}/{name}.jpg",
                                     "landmark_id": None, "split": "train"})
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small image set, its manifest, a synthetic-weight R50 checkpoint and direct references."""
    folder = tmp_path_factory.mktemp("extract")
    rows = write_set(folder, N_GOOD)
    write_manifest(pa.Table.from_pylist(rows), str(folder / "manifest.parquet"))
    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 0))
    save_checkpoint(model, str(folder / "model.pt"))
    model = load_model(str(folder / "model.pt"))
    images = {f"g{i}": cv2.imread(str(folder / "img" / f"g{i}.jpg")) for i in range(N_GOOD)}
    reference = {k: model.global_descriptor([im])[0] for k, im in images.items()}
    return {"folder": folder, "manifest": str(folder / "manifest.parquet"), "model_uri": str(folder / "model.pt"),
            "model": model, "images": images, "reference": reference}


def _config(dataset, output: str, **kw) -> ExtractConfig:
    base = dict(manifest=dataset["manifest"], model=dataset["model_uri"], output=output, shard_size=4,
                batch_size=4, part_rows=4)
    base.update(kw)
    return ExtractConfig(**base)


def _check_output(output: str, dataset, atol: float = 1e-5) -> None:
    """Every good image exactly once with the direct descriptor; every bad one in bad_inputs."""
    ids, X = features.read_descriptors(output)
    assert len(ids) == len(set(ids)) == N_GOOD
    for image_id, x in zip(ids, X):
        np.testing.assert_allclose(x, dataset["reference"][image_id], atol=atol, err_msg=image_id)
    bad = {r["image_id"]: (r["stage"], r["error"]) for r in features.read_bad_inputs(output).to_pylist()}
    assert bad == BAD


def test_extract_equals_direct_model_and_rerun_skips(ray_local, dataset, tmp_path):
    output = str(tmp_path / "out")
    cfg = _config(dataset, output, rerank_features=True)
    result = run_extract(cfg)
    counts = (result.shards, result.shards_skipped, result.images, result.bad_inputs)
    assert counts == (n_shards(4), 0, N_ROWS, len(BAD))
    _check_output(output, dataset)
    # the stored rerank features give the match probabilities of features computed directly
    model = dataset["model"]
    stored = features.read_rerank_levels(output)
    assert sorted(stored) == sorted(dataset["images"])
    keys = sorted(stored)[1:]
    direct = [model.rerank_features(dataset["images"][k]) for k in keys]
    query = model.rerank_features(dataset["images"]["g0"])
    expected = model.match_probability(query, direct)
    got = model.match_probability(RerankFeatures(stored["g0"]), [RerankFeatures(stored[k]) for k in keys])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # file metadata names the model and its hash
    meta = pq.read_schema(storage.committed_files(output, "descriptors")[0]).metadata
    assert json.loads(meta[b"cvnet.model_sha256"]) == json.loads(
        open(result.commit_uri).read())["model_sha256"]
    # a rerun commits nothing new and changes nothing
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "_commits").iterdir()}
    again = run_extract(cfg)
    assert (again.shards_skipped, again.images, again.committed_now) == (n_shards(4), 0, [])
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "_commits").iterdir()} == before
    # another config must not mix into this output
    with pytest.raises(CommitError, match="committed with config"):
        run_extract(_config(dataset, output, rerank_features=True, scales=(1.0,)))


def test_duplicate_manifest_ids_are_refused(dataset, tmp_path):
    rows = [{"image_id": "a", "uri": "x.jpg", "landmark_id": 1, "split": "t"}] * 2
    write_manifest(pa.Table.from_pylist(rows), str(tmp_path / "dup.parquet"))
    with pytest.raises(ExtractError, match=r"duplicate image_id\(s\) \['a'\]"):
        run_extract(_config(dataset, str(tmp_path / "o"), manifest=str(tmp_path / "dup.parquet")))


def _raylet_pid(ray) -> int:
    node = ray._private.worker._global_node
    return node.all_processes["raylet"][0].process.pid


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat") as handle:
            pid = int(handle.read().rsplit(")", 1)[1].split()[1])
    return False


def _actor_pids(ray) -> list[int]:
    raylet, found = _raylet_pid(ray), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"ExtractActor" in cmdline and _descends_from(int(entry), raylet):
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_local, dataset, tmp_path):
    output = tmp_path / "out"
    cfg = _config(dataset, str(output), part_rows=1, shard_size=3)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_extract(cfg)))
    runner.start()
    try:
        _wait_for(lambda: any((output / "_attempts").rglob("descriptors-*.parquet")), 120, "no part written")
        pids = _actor_pids(ray_local)
        assert pids and runner.is_alive(), "the kill must happen while the job runs"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        runner.join(timeout=240)
    assert "result" in outcome
    _check_output(str(output), dataset)


@pytest.fixture
def restore_tracking_uri():
    """The job sets MLflow's process-wide tracking URI (and its env var); put it back after."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(before)


def test_driver_killed_then_rerun_resumes(ray_local, dataset, tmp_path, restore_tracking_uri):
    output = tmp_path / "out"
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--manifest", dataset["manifest"], "--model", dataset["model_uri"], "--output", str(output),
            "--shard-size", "2", "--part-rows", "1", "--tracking-uri", tracking]
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.extract", *args,
         "--address", ray_local.get_runtime_context().gcs_address],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: any((output / "_commits").glob("*.json")), 180, "no shard committed")
        assert driver.poll() is None, "the driver must be killed mid-run"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    first = {p.name: p.read_bytes() for p in (output / "_commits").glob("*.json")}
    assert 1 <= len(first) < n_shards(2)

    from jobs.cli import build_parser

    parsed = build_parser().parse_args(["extract", *args])
    assert parsed._run(parsed) == 0
    # the shards committed before the crash were skipped and kept as they were
    now = {p.name: p.read_bytes() for p in (output / "_commits").glob("*.json")}
    assert len(now) == n_shards(2) and all(now[name] == body for name, body in first.items())
    _check_output(str(output), dataset)
    live = {storage.ShardCommit.from_json(b.decode(), n).attempt for n, b in now.items()}
    assert {p.name for p in (output / "_attempts").iterdir()} == live  # crashed parts removed
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("extract").experiment_id])
    run = next(r for r in runs if r.info.status == "FINISHED")
    assert run.data.metrics["failures"] == 3 and run.data.metrics["images_per_s"] > 0
    assert run.data.metrics["shards_skipped"] == len(first)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"_COMMITTED.json", "ds_stats.txt"}
    assert not any("secret" in k.lower() for k in run.data.params)


def test_extract_with_store_and_inputs_on_s3(ray_local, dataset, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    rows = write_set(tmp_path, N_GOOD, uri_prefix=f"{s3_bucket}/img")
    for name in [f"g{i}.jpg" for i in range(N_GOOD)] + ["corrupt.jpg", "empty.jpg", "pack.tar"]:
        fs.put_file(str(tmp_path / "img" / name), f"{s3_bucket[5:]}/img/{name}")
    fs.put_file(dataset["model_uri"], f"{s3_bucket[5:]}/models/model.pt")
    write_manifest(pa.Table.from_pylist(rows), f"{s3_bucket}/manifest.parquet")
    output = f"{s3_bucket}/features/out"
    cfg = _config(dataset, output, manifest=f"{s3_bucket}/manifest.parquet",
                  model=f"{s3_bucket}/models/model.pt", float16=True)
    result = run_extract(cfg)
    assert result.images == N_ROWS and result.commit_uri == f"{output}/_COMMITTED.json"
    _check_output(output, dataset, atol=2e-3)  # float16 storage: about 3 significant digits
    with fs.open(storage.committed_files(output, "descriptors")[0][5:], "rb") as handle:
        assert pq.read_schema(handle).field("descriptor").type.value_type == pa.float16()
    assert fs.exists(f"{s3_bucket[5:]}/features/out/_attempts/{result.attempt}")


@pytest.mark.gpu
def test_gpu_actors_match_the_cpu_model(ray_local, dataset, tmp_path):
    import torch

    if not torch.cuda.is_available() or not ray_local.cluster_resources().get("GPU"):
        pytest.skip("needs a CUDA device visible to Ray")
    output = str(tmp_path / "out")
    run_extract(_config(dataset, output, actor_gpus=0.5))
    _check_output(output, dataset, atol=1e-4)  # cuDNN kernels differ from the CPU ones in rounding


def test_image_too_small_for_rerank_features_is_a_bad_input(dataset, tmp_path):
    """A 16 px image has a descriptor but no rerank pyramid: with --rerank-features it is recorded
    as a bad input (stage "model"), not written as a descriptor without its features."""
    from dataclasses import asdict

    from pipelines.extract import ExtractActor, decode_batch

    tiny, normal = tmp_path / "tiny.jpg", tmp_path / "normal.jpg"
    cv2.imwrite(str(tiny), np.full((16, 16, 3), 120, np.uint8))
    cv2.imwrite(str(normal), dataset["images"]["g2"])
    rows = pa.Table.from_pylist([
        {"image_id": "tiny", "uri": str(tiny), "landmark_id": 1, "shard": "shard-00000"},
        {"image_id": "normal", "uri": str(normal), "landmark_id": 2, "shard": "shard-00000"}])
    cfg = _config(dataset, str(tmp_path / "out"), rerank_features=True)
    actor = ExtractActor(asdict(cfg), attempt="a1", model_sha256="0" * 64)
    parts = {p["kind"]: p for p in actor(decode_batch(rows)).to_pylist()}
    assert parts["descriptors"]["image_ids"] == ["normal"]
    assert parts["rerank"]["image_ids"] == ["normal"]
    assert parts["bad_inputs"]["image_ids"] == ["tiny"]
    bad = pq.read_table(str(tmp_path / "out" / parts["bad_inputs"]["file"])).to_pylist()
    assert bad[0]["stage"] == "model" and "too small for the rerank pyramid" in bad[0]["error"]

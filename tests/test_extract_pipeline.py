"""Extraction on a real local Ray: exactness, growth, changed URIs, failure classes, faults, S3."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from cvnet import features, storage
from cvnet.config import ExtractConfig
from cvnet.data.manifest import tar_member_uri, write_manifest
from cvnet.models.checkpoints import load_model, save_checkpoint
from cvnet.models.cvnet import CVNet
from cvnet.models.rerank import RerankFeatures
from cvnet.models.synthetic_weights import synthetic_state_dict
from cvnet.tables import LeaseHeld, SettingsMismatch, Table
from flaky_fs import injected_failures
from ray_procs import JobThread, kill_actors_mid_run, table_version, wait_for
from pipelines.extract import ExtractError, TooManyBadInputs, run_extract

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(64, 64), (64, 80), (96, 72), (72, 96)]
N_GOOD = 8
IN_TAR = ("g0", "g1")  # read as members of img/pack.tar
BAD = {"corrupt": ("decode", "not a decodable image"), "empty": ("decode", "empty file"),
       "missing": ("read", "file not found")}
N_ROWS = N_GOOD + len(BAD)


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random scene (JPEG-friendly): blurred noise plus a few rectangles."""
    im = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (7, 7), 0)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        cv2.rectangle(im, (x, y), (x + 8, y + 8), [int(c) for c in rng.integers(0, 255, 3)], -1)
    return im


def write_set(folder: Path, n_good: int, uri_prefix: str | None = None, start: int = 0) -> list[dict]:
    """Good JPEGs ``g<start>..`` (g0, g1 as tar members) + corrupt, empty and missing entries
    (only with ``start == 0``); returns manifest rows."""
    rng = np.random.default_rng(7 + start)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    prefix = uri_prefix or str(folder / "img")
    rows = []
    for i in range(start, start + n_good):
        cv2.imwrite(str(folder / "img" / f"g{i}.jpg"), _image(rng, *SIZES[i % len(SIZES)]))
        uri = f"{prefix}/g{i}.jpg"
        if f"g{i}" in IN_TAR:
            uri = tar_member_uri(f"{prefix}/pack.tar", f"g{i}.jpg")
        rows.append({"image_id": f"g{i}", "uri": uri, "landmark_id": i % 3, "split": "train"})
    if start:
        return rows
    with tarfile.open(folder / "img" / "pack.tar", "w") as tar:
        for name in IN_TAR:
            tar.add(folder / "img" / f"{name}.jpg", arcname=f"{name}.jpg")
    (folder / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (folder / "img" / "empty.jpg").write_bytes(b"")
    for name in BAD:
        rows.insert(len(rows) // 2, {"image_id": name, "uri": f"{prefix}/{name}.jpg",
                                     "landmark_id": None, "split": "train"})
    return rows


def _model_and_reference(folder: Path, images: dict[str, np.ndarray]):
    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 0))
    save_checkpoint(model, str(folder / "model.pt"))
    model = load_model(str(folder / "model.pt"))
    return model, {k: model.global_descriptor([im])[0] for k, im in images.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small image set, its manifest, a synthetic-weight R50 checkpoint and direct references."""
    folder = tmp_path_factory.mktemp("extract")
    rows = write_set(folder, N_GOOD)
    write_manifest(pa.Table.from_pylist(rows), str(folder / "manifest.parquet"))
    images = {f"g{i}": cv2.imread(str(folder / "img" / f"g{i}.jpg")) for i in range(N_GOOD)}
    model, reference = _model_and_reference(folder, images)
    return {"folder": folder, "rows": rows, "manifest": str(folder / "manifest.parquet"),
            "model_uri": str(folder / "model.pt"), "model": model, "images": images, "reference": reference}


def _config(dataset, output: str, **kw) -> ExtractConfig:
    base = dict(manifest=dataset["manifest"], model=dataset["model_uri"], output=output, shard_size=4,
                batch_size=4, part_rows=4, max_bad_fraction=1.0)
    base.update(kw)
    return ExtractConfig(**base)


def _check_output(output: str, dataset, good: int = N_GOOD, bad: dict | None = None, atol: float = 1e-5) -> None:
    """Every good image exactly once with the direct descriptor; every bad one in bad_inputs, once."""
    ids, X = features.read_descriptors(output)
    assert len(ids) == len(set(ids)) == good
    for image_id, x in zip(ids, X):
        np.testing.assert_allclose(x, dataset["reference"][image_id], atol=atol, err_msg=image_id)
    rows = features.read_bad_inputs(output).to_pylist()
    assert len(rows) == len({r["image_id"] for r in rows})
    assert {r["image_id"]: (r["stage"], r["error"]) for r in rows} == (BAD if bad is None else bad)
    assert not set(ids) & {r["image_id"] for r in rows}


def test_extract_equals_direct_model_and_rerun_skips(ray_local, dataset, tmp_path):
    output = str(tmp_path / "out")
    cfg = _config(dataset, output, rerank_features=True)
    result = run_extract(cfg)
    assert (result.images, result.bad_inputs, result.skipped) == (N_ROWS, len(BAD), 0)
    _check_output(output, dataset)
    # rerank features read by key give the match probabilities of features computed directly
    model = dataset["model"]
    keys = ["g3", "g1", "g5"]
    stored = features.read_rerank_levels(output, ["g0", *keys])
    direct = [model.rerank_features(dataset["images"][k]) for k in keys]
    expected = model.match_probability(model.rerank_features(dataset["images"]["g0"]), direct)
    got = model.match_probability(RerankFeatures(stored["g0"]), [RerankFeatures(stored[k]) for k in keys])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the table names the model by its hash; a reader with another model is refused
    table = features.open_features(output)
    assert table.settings["extractor_sha256"] == features.open_features(
        output, extractor_sha256=table.settings["extractor_sha256"]).settings["extractor_sha256"]
    with pytest.raises(features.ModelMismatch, match="not of the model in use"):
        features.read_descriptors(output, extractor_sha256="0" * 64)
    # a rerun commits nothing and makes no new version
    again = run_extract(cfg)
    assert (again.images, again.skipped) == (0, N_ROWS)
    assert again.versions_written == again.versions_read == result.versions_written
    # settings that change the numbers are refused with both values
    with pytest.raises(SettingsMismatch, match=r"scales: table has \[0.7071, 1.0, 1.4142\], this run has \[1.0\]"):
        run_extract(_config(dataset, output, rerank_features=True, scales=(1.0,)))


def test_default_output_is_one_table_per_model(ray_local, dataset, tmp_path):
    store = tmp_path / "store"
    result = run_extract(_config(dataset, None, store=str(store)))
    sha = features.open_features(result.output).settings["extractor_sha256"]
    assert result.output == f"{store}/features/model-{sha[:12]}"


def test_grown_manifest_extracts_only_the_new_images(ray_local, dataset, tmp_path):
    """13 rows (shard size 8), then 8 more at the same manifest URI: every image exactly once."""
    rows = write_set(tmp_path, 13 - len(BAD))
    manifest = str(tmp_path / "m.parquet")
    write_manifest(pa.Table.from_pylist(rows), manifest)
    images = {r["image_id"]: cv2.imread(str(tmp_path / "img" / f"{r['image_id']}.jpg"))
              for r in rows if r["image_id"] not in BAD}
    extra = write_set(tmp_path, 8, start=13 - len(BAD))
    images.update({r["image_id"]: cv2.imread(str(tmp_path / "img" / f"{r['image_id']}.jpg")) for r in extra})
    _, reference = _model_and_reference(tmp_path, images)
    data = dict(dataset, manifest=manifest, model_uri=str(tmp_path / "model.pt"), reference=reference)
    output = str(tmp_path / "out")
    first = run_extract(_config(data, output, shard_size=8))
    assert first.images == 13
    write_manifest(pa.Table.from_pylist(rows + extra), manifest)
    second = run_extract(_config(data, output, shard_size=8))
    assert (second.images, second.skipped, second.bad_inputs) == (8, 13, 0)
    assert second.versions_written["features"] > first.versions_written["features"]
    _check_output(output, data, good=len(images))
    # the snapshot the first run wrote is still readable by version
    ids, _ = features.read_descriptors(output, version=first.versions_written["features"])
    assert len(ids) == 13 - len(BAD)


def test_changed_uri_is_refused_then_refreshed(ray_local, dataset, tmp_path):
    output = str(tmp_path / "out")
    run_extract(_config(dataset, output))
    rows = [dict(r) for r in dataset["rows"]]
    moved = tmp_path / "g4-moved.png"  # lossless: the same pixels as g5
    cv2.imwrite(str(moved), dataset["images"]["g5"])
    next(r for r in rows if r["image_id"] == "g4")["uri"] = str(moved)
    manifest = str(tmp_path / "changed.parquet")
    write_manifest(pa.Table.from_pylist(rows), manifest)
    with pytest.raises(ExtractError, match=r"g4: .*g4.jpg -> .*g4-moved.png.*--refresh-changed"):
        run_extract(_config(dataset, output, manifest=manifest))
    result = run_extract(_config(dataset, output, manifest=manifest, refresh_changed=True))
    assert result.images == 1
    reference = dict(dataset["reference"], g4=dataset["reference"]["g5"])
    _check_output(output, dict(dataset, reference=reference))
    assert features.open_features(output).take(["g4"], ["uri"]).column("uri")[0].as_py() == str(moved)


def test_manifest_with_relative_paths_reads_them_from_its_folder(ray_local, dataset, tmp_path):
    """A manifest holding relative paths (written by hand, not by ``cvnet manifest``) is read
    relative to its own folder, wherever the job runs: no image is recorded as "file not found"."""
    import pyarrow.parquet as pq

    rows = [dict(r, uri=r["uri"].replace(str(dataset["folder"]) + "/", "")) for r in dataset["rows"]]
    assert not any(str(dataset["folder"]) in r["uri"] for r in rows)
    manifest = dataset["folder"] / "relative.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    output = str(tmp_path / "out")
    result = run_extract(_config(dataset, output, manifest=str(manifest)))
    assert (result.images, result.bad_inputs) == (N_ROWS, len(BAD))
    _check_output(output, dataset)


def test_transient_read_failures_are_retried_not_recorded(ray_local, dataset, tmp_path):
    """A read that fails twice and then succeeds ends in the features; one that keeps failing
    fails the job naming the image, and is not recorded as bad."""
    image = tmp_path / "g2.png"  # lossless: the same pixels as the reference's
    cv2.imwrite(str(image), dataset["images"]["g2"])
    rows = [{"image_id": "g2", "uri": f"flaky://2{image}", "landmark_id": 1, "split": "t"}]
    write_manifest(pa.Table.from_pylist(rows), str(tmp_path / "flaky.parquet"))
    output = str(tmp_path / "out")
    result = run_extract(_config(dataset, output, manifest=str(tmp_path / "flaky.parquet")))
    assert injected_failures(str(image)) == 2  # the two failures happened
    assert (result.images, result.bad_inputs) == (1, 0)
    ids, X = features.read_descriptors(output)
    assert ids == ["g2"]
    np.testing.assert_allclose(X[0], dataset["reference"]["g2"], atol=1e-5)

    stuck = tmp_path / "g3.png"
    cv2.imwrite(str(stuck), dataset["images"]["g3"])
    rows = [{"image_id": "g3", "uri": f"flaky://99{stuck}", "landmark_id": 1, "split": "t"}]
    write_manifest(pa.Table.from_pylist(rows), str(tmp_path / "stuck.parquet"))
    with pytest.raises(Exception, match=r"g3 \(flaky://99.*still failing after 1 retries"):
        run_extract(_config(dataset, output, manifest=str(tmp_path / "stuck.parquet"), transient_retries=1))
    assert injected_failures(str(stuck)) == 2
    assert features.read_bad_inputs(output).num_rows == 0


def test_too_many_bad_inputs_commit_then_fail_with_reasons(ray_local, dataset, tmp_path):
    output = str(tmp_path / "out")
    with pytest.raises(TooManyBadInputs, match=r"3 of the 11 inputs.*top reasons: 1 x decode: "):
        run_extract(_config(dataset, output, max_bad_fraction=0.2))
    _check_output(output, dataset)  # committed anyway


def test_retry_bad_inputs_reprocesses_them(ray_local, dataset, tmp_path):
    rows = write_set(tmp_path, 2)
    manifest = str(tmp_path / "m.parquet")
    write_manifest(pa.Table.from_pylist(rows), manifest)
    images = {f"g{i}": cv2.imread(str(tmp_path / "img" / f"g{i}.jpg")) for i in range(2)}
    output = str(tmp_path / "out")
    run_extract(_config(dataset, output, manifest=manifest))
    cv2.imwrite(str(tmp_path / "img" / "corrupt.jpg"), dataset["images"]["g6"])
    fixed = cv2.imread(str(tmp_path / "img" / "corrupt.jpg"))
    assert run_extract(_config(dataset, output, manifest=manifest)).images == 0  # recorded: not retried
    result = run_extract(_config(dataset, output, manifest=manifest, retry_bad_inputs=True))
    assert (result.images, result.bad_inputs) == (3, 2)
    _, reference = _model_and_reference(tmp_path, dict(images, corrupt=fixed))
    _check_output(output, dict(dataset, reference=reference), good=3,
                  bad={k: v for k, v in BAD.items() if k != "corrupt"})


def _rows(uri: str) -> int:
    try:
        return Table.open(uri).num_rows()
    except FileNotFoundError:
        return 0


def _with_slow_image(dataset, tmp_path: Path) -> tuple[dict, str, Path]:
    """The dataset with a leading image whose reads fail 4 times (7.5 s of backoff with
    ``transient_retries=4``), so that a run is still going when a test acts on it."""
    slow = tmp_path / "slow.png"
    cv2.imwrite(str(slow), dataset["images"]["g7"])
    rows = [{"image_id": "slow", "uri": f"flaky://4{slow}", "landmark_id": 1, "split": "t"}, *dataset["rows"]]
    manifest = str(tmp_path / "with-slow.parquet")
    write_manifest(pa.Table.from_pylist(rows), manifest)
    return dict(dataset, reference=dict(dataset["reference"], slow=dataset["reference"]["g7"])), manifest, slow


def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_local, dataset, tmp_path):
    output = tmp_path / "out"
    dataset, manifest, slow = _with_slow_image(dataset, tmp_path)
    cfg = _config(dataset, str(output), manifest=manifest, part_rows=1, shard_size=1, read_rows=1, transient_retries=4)
    runner = JobThread(run_extract, cfg)
    runner.start()
    try:
        wait_for(lambda: table_version(str(output / features.FEATURES)) >= 2, 120, "nothing committed")
        restarted = kill_actors_mid_run(ray_local, b"ExtractActor", runner)  # a new actor serves the rest
    finally:
        runner.join(timeout=240)
    runner.result()  # the job ended without an error (raised here if it had one)
    assert restarted  # a new actor served the rest
    _check_output(str(output), dataset, good=N_GOOD + 1)


@pytest.fixture
def restore_tracking_uri():
    """The job sets MLflow's process-wide tracking URI (and its env var); put it back after."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(before)


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(ray_local, dataset, tmp_path, restore_tracking_uri):
    output = tmp_path / "out"
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    # 24 more images than the module's set, so that the run is still going when it is killed
    extra = write_set(tmp_path, 24, start=N_GOOD)
    manifest = str(tmp_path / "more.parquet")
    write_manifest(pa.Table.from_pylist(dataset["rows"] + extra), manifest)
    model = dataset["model"]
    reference = dict(dataset["reference"], **{
        r["image_id"]: model.global_descriptor([cv2.imread(str(tmp_path / "img" / f"{r['image_id']}.jpg"))])[0]
        for r in extra})
    dataset = dict(dataset, reference=reference)
    good, rows = N_GOOD + len(extra), N_ROWS + len(extra)
    args = ["--manifest", manifest, "--model", dataset["model_uri"], "--output", str(output),
            "--shard-size", "2", "--part-rows", "1", "--tracking-uri", tracking, "--max-bad-fraction", "1"]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.extract", *args,
         "--address", ray_local.get_runtime_context().gcs_address],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    features_uri = str(output / features.FEATURES)
    try:
        wait_for(lambda: table_version(features_uri) >= 2 or driver.poll() is not None, 300, "nothing committed")
        assert driver.poll() is None, "the driver must be killed mid-run: " + (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    before = Table.open(features_uri)
    first = set(before.keys().to_pylist())
    assert 1 <= len(first) < good
    committed = len(first) + _rows(str(output / features.BAD_INPUTS))

    from jobs.cli import build_parser

    parsed = build_parser().parse_args(["extract", *args])
    assert parsed._run(parsed) == 0  # the dead driver's lease does not block the rerun
    _check_output(str(output), dataset, good=good)
    # the rows committed before the crash are kept as they were (read at the old version)
    kept = Table.open(features_uri, before.version).read(["image_id", "descriptor"])
    now = Table.open(features_uri).take(kept.column("image_id").to_pylist(), ["image_id", "descriptor"])
    assert now.equals(kept)
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("extract").experiment_id])
    run = next(r for r in runs if r.info.status == "FINISHED")
    assert run.data.metrics["images"] == rows - committed
    assert run.data.metrics["images_per_s"] > 0
    assert int(run.data.params["features_version_read"]) == before.version
    assert not any("secret" in k.lower() for k in run.data.params)


def _two_runs_at_once(dataset, output: str, tmp_path: Path, **kw) -> None:
    """A second run on an output that a live run holds is refused, naming the holder; the output
    ends exactly once."""
    dataset, manifest, slow = _with_slow_image(dataset, tmp_path)
    cfg = _config(dataset, output, manifest=manifest, part_rows=1, shard_size=1, read_rows=1, transient_retries=4, **kw)
    runner = JobThread(run_extract, cfg)
    runner.start()
    try:
        wait_for(lambda: table_version(storage.join(output, features.FEATURES)) >= 2, 180, "nothing committed")
        assert runner.is_alive()
        with pytest.raises(LeaseHeld, match=r"is held by extract .* \(host .*, pid \d+\) since"):
            run_extract(cfg)
    finally:
        runner.join(timeout=240)
    assert runner.result().images == N_ROWS + 1 and injected_failures(str(slow)) == 4
    assert run_extract(cfg).images == 0  # free again once the first run ended
    _check_output(output, dataset, good=N_GOOD + 1, **({"atol": 2e-3} if kw.get("float16") else {}))


def test_two_runs_at_once_locally(ray_local, dataset, tmp_path):
    _two_runs_at_once(dataset, str(tmp_path / "out"), tmp_path)


def test_s3_inputs_store_and_two_runs_at_once(ray_local, dataset, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    rows = write_set(tmp_path, N_GOOD, uri_prefix=f"{s3_bucket}/img")
    for name in [f"g{i}.jpg" for i in range(N_GOOD)] + ["corrupt.jpg", "empty.jpg", "pack.tar"]:
        fs.put_file(str(tmp_path / "img" / name), f"{s3_bucket[5:]}/img/{name}")
    fs.put_file(dataset["model_uri"], f"{s3_bucket[5:]}/models/model.pt")
    write_manifest(pa.Table.from_pylist(rows), f"{s3_bucket}/manifest.parquet")
    data = dict(dataset, rows=rows, manifest=f"{s3_bucket}/manifest.parquet", model_uri=f"{s3_bucket}/models/model.pt")
    output = f"{s3_bucket}/features/out"
    _two_runs_at_once(data, output, tmp_path, float16=True)
    table = features.open_features(output)
    assert table.schema.field("descriptor").type.value_type == pa.float16()
    assert table.settings["float16"] is True


@pytest.mark.slow
def test_node_removed_mid_run(dataset, tmp_path):
    """On a ``ray.cluster_utils.Cluster``: the node running the actor is removed and another
    joins; every image ends exactly once (runs in its own process: its own Ray cluster)."""
    output = tmp_path / "out"
    dataset, manifest, _ = _with_slow_image(dataset, tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scenarios" / "node_removed.py"),
                           manifest, dataset["model_uri"], str(output)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert report["removed_node_alive"] == "False"  # the node really went away mid-run
    assert int(report["committed_before_removal"]) < N_ROWS + 1
    assert report["actor_restarted_on_new_node"] == "True"
    _check_output(str(output), dataset, good=N_GOOD + 1)


@pytest.mark.gpu
def test_gpu_actors_match_the_cpu_model(ray_local, dataset, tmp_path):
    import torch

    if not torch.cuda.is_available() or not ray_local.cluster_resources().get("GPU"):
        pytest.skip("needs a CUDA device visible to Ray")
    output = str(tmp_path / "out")
    run_extract(_config(dataset, output, actor_gpus=0.5))
    _check_output(output, dataset, atol=1e-4)  # cuDNN kernels differ from the CPU ones in rounding


def test_image_too_small_for_rerank_features_is_a_bad_input(dataset, tmp_path):
    """A 16 px image has a descriptor but no rerank pyramid: with rerank features it is recorded
    as a bad input (stage "model"), not written as a descriptor without its features."""
    from cvnet.tables import TableWriter
    from pipelines.extract import ExtractActor, _open_tables, decode_batch

    tiny, normal = tmp_path / "tiny.jpg", tmp_path / "normal.jpg"
    cv2.imwrite(str(tiny), np.full((16, 16, 3), 120, np.uint8))
    cv2.imwrite(str(normal), dataset["images"]["g2"])
    rows = pa.Table.from_pylist([
        {"image_id": "tiny", "uri": str(tiny), "landmark_id": 1},
        {"image_id": "normal", "uri": str(normal), "landmark_id": 2}])
    output = str(tmp_path / "out")
    cfg = _config(dataset, output, rerank_features=True)
    writers: dict[str, TableWriter] = _open_tables(cfg, output, "0" * 64, lease=None)
    actor = ExtractActor(cfg, output)
    summaries = {s["table"]: s for s in actor(decode_batch(rows)).to_pylist()}
    assert summaries["features"]["keys"] == ["normal"]
    assert summaries["bad_inputs"]["keys"] == ["tiny"]
    for name, summary in summaries.items():
        writers[name].commit(summary["fragments"], summary["keys"])
    bad = features.read_bad_inputs(output).to_pylist()
    assert bad[0]["stage"] == "model" and "too small for the rerank pyramid" in bad[0]["error"]
    assert features.read_rerank_levels(output, ["normal"])["normal"][0].shape[0] == 256

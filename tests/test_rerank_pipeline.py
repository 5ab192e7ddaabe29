"""cvnet rerank on a real local Ray: equal to a direct computation, cached == recompute, 1 vs 2
actors, IVF recall, killed actor / killed driver then rerun: every query exactly once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cvnet import storage
from cvnet.config import ExtractConfig, RerankConfig
from cvnet.data.manifest import write_manifest
from cvnet.data.revisitop import load_ground_truth, load_image, load_query_image, revisitop_manifest
from cvnet.data.synthetic import generate
from cvnet.models.checkpoints import load_model, save_checkpoint
from cvnet.models.cvnet import CVNet
from cvnet.models.rerank import match_probability
from cvnet.models.synthetic_weights import synthetic_state_dict
from cvnet.tables import Table
from pipelines.extract import run_extract
from pipelines.rerank import run_rerank
from ray_procs import JobThread, kill_actors_mid_run, table_version, wait_for

ROOT = Path(__file__).resolve().parent.parent
NAME = "roxsynth"
K = 4


@pytest.fixture(scope="module")
def bench(tmp_path_factory, ray_local):
    """A tiny synthetic revisitop benchmark, a synthetic-weight checkpoint, both feature tables."""
    folder = tmp_path_factory.mktemp("rerank")
    generate(str(folder / "synth"), seed=3, landmarks=2, images_per_landmark=2, queries=4, distractors=4, size=64)
    root = str(folder / "synth" / "revisitop" / NAME)
    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 0))
    model_uri = str(folder / "model.pt")
    save_checkpoint(model, model_uri)
    manifest = revisitop_manifest(root, NAME)
    out = {}
    for split in ("db", "query"):
        path = str(folder / f"{split}.parquet")
        write_manifest(manifest.filter(pa.compute.equal(manifest["split"], split)), path)
        out[split] = str(folder / f"features-{split}")
        run_extract(ExtractConfig(manifest=path, model=model_uri, output=out[split], rerank_features=True,
                                  part_rows=8, batch_size=8))
    return {"root": root, "model_uri": model_uri, "gallery": out["db"], "queries": out["query"],
            "folder": folder, "gt": load_ground_truth(storage.join(root, f"gnd_{NAME}.pkl"))}


def _cfg(bench, out, **kw) -> RerankConfig:
    return RerankConfig(**{"gallery": bench["gallery"], "queries": bench["queries"], "model": bench["model_uri"],
                           "k": K, "depth": 8, "out": str(out), "commit_queries": 1, "part_images": 2, **kw})


def _rankings(uri: str) -> pa.Table:
    return Table.open(uri).read().sort_by([("query_id", "ascending"), ("rank", "ascending")])


def _direct(bench) -> dict[str, list[tuple[str, float]]]:
    """Per query: (image id, fused score) in order, from CVNet.global_descriptor + match_probability."""
    model, gt = load_model(bench["model_uri"]), bench["gt"]
    db = [load_image(bench["root"], n) for n in gt["imlist"]]
    qs = [load_query_image(bench["root"], gt, q) for q in range(len(gt["qimlist"]))]
    X, Q = model.global_descriptor(db), model.global_descriptor(qs)
    db_feats = [model.rerank_features(im) for im in db]
    out = {}
    for q, name in enumerate(gt["qimlist"]):
        sims = (X.astype(np.float64) @ Q[q].astype(np.float64)).astype(np.float32)
        order = sorted(range(len(db)), key=lambda i: (-sims[i], gt["imlist"][i]))[:8]
        p = match_probability(model.cv_learner, model.rerank_features(qs[q]), [db_feats[i] for i in order[:K]])
        head = sorted(((sims[i] + 0.5 * p[j], j, i) for j, i in enumerate(order[:K])), key=lambda t: (-t[0], t[1]))
        out[name] = [(gt["imlist"][i], s) for s, _, i in head] + [(gt["imlist"][i], sims[i]) for i in order[K:]]
    return out


def _check_equal_direct(table: pa.Table, direct) -> None:
    assert table.num_rows == sum(len(v) for v in direct.values())
    for name, expected in direct.items():
        rows = table.filter(pa.compute.equal(table["query_id"], name))
        assert rows["image_id"].to_pylist() == [i for i, _ in expected], name
        np.testing.assert_allclose(rows["score"].to_numpy(), [s for _, s in expected], atol=1e-5)
        assert rows["rank"].to_pylist() == list(range(1, len(expected) + 1))
        assert rows["rerank_score"].null_count == len(expected) - K


@pytest.mark.slow
def test_rerank_equals_direct_cached_equals_recompute_and_actors(bench, tmp_path):
    direct = _direct(bench)
    cached = run_rerank(_cfg(bench, tmp_path / "cached"))
    assert cached.queries == 4 and cached.pairs == 4 * K and cached.skipped == 0
    table = _rankings(cached.output)
    _check_equal_direct(table, direct)
    recompute = run_rerank(_cfg(bench, tmp_path / "recompute", rerank_from="recompute"))
    np.testing.assert_allclose(_rankings(recompute.output)["score"].to_numpy(), table["score"].to_numpy(), atol=1e-5)
    assert _rankings(recompute.output)["image_id"].equals(table["image_id"])
    two = run_rerank(_cfg(bench, tmp_path / "two", num_actors=2, search_shards=3))
    assert _rankings(two.output).equals(table)
    # a rerun finds nothing to do; the table is unchanged
    again = run_rerank(_cfg(bench, tmp_path / "cached"))
    assert again.queries == 0 and again.skipped == 4 and _rankings(again.output).equals(table)


def test_all_vs_all_excludes_each_image_itself(bench, tmp_path):
    result = run_rerank(RerankConfig(gallery=bench["gallery"], model=bench["model_uri"], k=3, out=str(tmp_path / "a")))
    table = Table.open(result.output).read()
    assert result.queries == len(bench["gt"]["imlist"])
    assert not any(q == i for q, i in zip(table["query_id"].to_pylist(), table["image_id"].to_pylist()))


def test_ivf_measures_recall_against_exact(bench, tmp_path):
    result = run_rerank(_cfg(bench, tmp_path / "ivf", index="ivf", nlist=1, search_shards=1))
    assert result.recall == pytest.approx(1.0)  # one list: IVF scans everything
    exact = _rankings(run_rerank(_cfg(bench, tmp_path / "flat", search_shards=1)).output)
    assert _rankings(result.output)["image_id"].equals(exact["image_id"])


def _exactly_once(uri: str, bench) -> None:
    table = Table.open(uri).read()
    counts = pa.compute.value_counts(table["query_id"]).to_pylist()
    assert sorted(c["values"] for c in counts) == sorted(bench["gt"]["qimlist"])
    assert {c["counts"] for c in counts} == {8}


@pytest.mark.slow
def test_killed_actor_then_every_query_once(ray_local, bench, tmp_path):
    out = tmp_path / "killed"
    cfg = _cfg(bench, out, wave_queries=1, part_images=1)
    runner = JobThread(run_rerank, cfg)
    runner.start()
    try:
        wait_for(lambda: table_version(str(out)) >= 2, 180, "nothing committed")
        restarted = kill_actors_mid_run(ray_local, b"RerankActor", runner)
    finally:
        runner.join(timeout=300)
    runner.result()  # the job ended without an error (raised here if it had one)
    assert restarted  # a new actor served the rest
    _exactly_once(str(out), bench)


@pytest.mark.slow
def test_killed_driver_then_rerun_every_query_once(ray_local, bench, tmp_path):
    out = tmp_path / "driver"
    args = ["rerank", "--gallery", bench["gallery"], "--queries", bench["queries"], "--model", bench["model_uri"],
            "--k", str(K), "--depth", "8", "--out", str(out), "--wave-queries", "1", "--commit-queries", "1",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    driver = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args, "--address",
                               ray_local.get_runtime_context().gcs_address],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: table_version(str(out)) >= 2, 240, "nothing committed")
        assert driver.poll() is None, "the driver must be killed mid-run"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = Table.open(str(out)).keys().to_pylist()
    assert 1 <= len(before) < 4
    from jobs.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert parsed._run(parsed) == 0
    _exactly_once(str(out), bench)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rerank").experiment_id])
    run = next(r for r in runs if r.info.status == "FINISHED")
    assert run.data.metrics["queries"] == 4 - len(before)
    assert int(run.data.params["rankings_version_read"]) >= 2


def _evaluate(bench, tmp_path, *extra: str) -> dict:
    import json

    from jobs.cli import build_parser

    args = ["evaluate", "--benchmark", bench["root"], "--model", bench["model_uri"], "--rerank",
            "--k", str(K), "--store", str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--json", *extra]
    parsed = build_parser().parse_args(args)
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert parsed._run(parsed) == 0
    return json.loads(printed.getvalue().strip().splitlines()[-1])


@pytest.mark.slow
def test_evaluate_on_the_pipeline_with_distractors(bench, tmp_path, capsys):
    """Global mAP from the pipeline equals the in-process evaluate_global; the re-ranked metrics
    exist under both shortlist rules; added distractors lower global mAP (numbers printed)."""
    from cvnet.data.synthetic_distractors import generate_distractors
    from cvnet.retrieval import evaluate_global

    plain = _evaluate(bench, tmp_path)
    assert set(plain) == {"global", "rerank_topk", "rerank_gt_aware"}
    direct = evaluate_global(load_model(bench["model_uri"]).encoder_q, bench["root"])
    for protocol, scores in direct.items():
        assert plain["global"][protocol]["map"] == pytest.approx(scores["map"], abs=1e-6)
    manifest = generate_distractors(str(tmp_path / "distractors"), 12, seed=3, size=64)
    with_d = _evaluate(bench, tmp_path, "--distractors", manifest)
    assert with_d["global"]["medium"]["map"] < plain["global"]["medium"]["map"]
    with capsys.disabled():
        for name, res in (("plain", plain), ("+12 distractors", with_d)):
            print(f"\n{name}: " + "; ".join(f"{label} E/M/H mAP " + "/".join(f"{100 * res[label][p]['map']:.1f}"
                                                                          for p in ("easy", "medium", "hard"))
                                            for label in res))


@pytest.mark.gpu
def test_gpu_actors_match_the_cpu_rankings(ray_local, bench, tmp_path):
    import torch

    if not torch.cuda.is_available() or not ray_local.cluster_resources().get("GPU"):
        pytest.skip("needs a CUDA device visible to Ray")
    cpu = _rankings(run_rerank(_cfg(bench, tmp_path / "cpu")).output)
    gpu = _rankings(run_rerank(_cfg(bench, tmp_path / "gpu", actor_gpus=0.5)).output)
    assert gpu["image_id"].equals(cpu["image_id"])
    np.testing.assert_allclose(gpu["score"].to_numpy(), cpu["score"].to_numpy(), atol=1e-4)

"""``cvnet demo --json``: the whole loop on a small synthetic collection, through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["synth.landmarks=24", "synth.images_per_landmark=6", "synth.queries=10", "synth.distractors=0",
         "stage1.optim.max_steps=4", "stage1.checkpoint.every_steps=2", "stage1.optim.warmup_steps=1",
         "stage2.optim.max_steps=4", "stage2.checkpoint.every_steps=2", "stage2.optim.warmup_steps=1",
         "stage2.data.image_size=64", "stage2.loader.workers=0",
         "refresh.train.optim.max_steps=2", "refresh.train.checkpoint.every_steps=2",
         "refresh.train.optim.warmup_steps=1"]


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_prints_one_json_object(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from cvnet.data.manifest import read_manifest
    from cvnet.tables import Table

    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the embedded default
    env |= {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "CVNET_MODEL_CACHE": str(tmp_path / "models")}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--store", str(store), "--json", *SMALL],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert "[demo] refresh:" in done.stderr

    assert set(out["map"]) == {"global_untrained", "global", "rerank_topk", "rerank_gt_aware"}
    for row in out["map"].values():
        assert set(row) == {"easy", "medium", "hard"} and all(0 < v <= 100 for v in row.values())

    # the refresh extracted the images that arrived: the features cover the whole manifest
    everything = read_manifest(str(store / "datasets" / "synth-train.parquet"))
    first = read_manifest(str(store / "datasets" / "synth-train-first.parquet"))
    assert 0 < len(first) < len(everything)
    tables = out["tables"]
    features = Table.open(tables["features"]["uri"])
    assert tables["features"]["version"] == features.version
    assert sorted(features.keys().to_pylist()) == sorted(everything.column("image_id").to_pylist())
    negatives = Table.open(tables["hard negatives"]["uri"])
    assert negatives.num_rows() == len(everything) and tables["hard negatives"]["version"] == negatives.version

    # the registry: one stage-1 version, the stage-2 model and the refresh's candidate
    refresh = out["refresh"]
    assert refresh["id"] and refresh["candidate_version"] == "2" and isinstance(refresh["promoted"], bool)
    assert out["models"]["cvnet-global"]["champion"] == "1"
    rerank = out["models"]["cvnet-rerank"]
    assert rerank["challenger"] == "2"
    assert rerank["champion"] == ("2" if refresh["promoted"] else "1")
    assert rerank["previous"] == ("1" if refresh["promoted"] else None)
    client = MlflowClient(out["mlflow"]["tracking_uri"])
    assert len(client.search_model_versions("name = 'cvnet-rerank'")) == 2
    assert out["mlflow"]["tracking_uri"] == f"sqlite:///{store}/mlflow.db"  # everything in the store
    assert out["seconds"]["total"] > 0 and set(out["mlflow"]["runs"]) == {"stage 1", "stage 2", "evaluate", "refresh"}

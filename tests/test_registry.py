"""The registry: CVNet as MLflow pyfunc models on a real ``mlflow server``, aliases, the gate,
``models:/`` URIs in ``load_model``, and ``cvnet promote`` / ``cvnet rollback``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvnet.registry import PromotionDecision, decide_promotion, parse_models_uri

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- pure rules

def test_decide_promotion_needs_the_gain_on_the_metric():
    better = decide_promotion({"map": 31.0}, {"map": 30.0}, "map", min_gain=0.5)
    assert better.promote and "gain +1" in better.reason
    worse = decide_promotion({"map": 30.2}, {"map": 30.0}, "map", min_gain=0.5)
    assert not worse.promote and "keep the champion" in worse.reason
    assert decide_promotion({"map": 30.5}, {"map": 30.0}, "map", min_gain=0.5).promote  # at the bar
    assert not decide_promotion({"map": 29.0}, {"map": 30.0}, "map", min_gain=0.0).promote
    assert decide_promotion({"map": 1.0}, None, "map", 0.5) == \
        PromotionDecision(True, "no champion yet; candidate map=1")
    unknown = decide_promotion({"map": 40.0}, {"other": 1.0}, "map", 0.5)
    assert not unknown.promote and "champion has no 'map'" in unknown.reason
    with pytest.raises(ValueError, match="candidate has no finite metric 'map'"):
        decide_promotion({"mAP": 40.0}, {"map": 1.0}, "map", 0.5)
    with pytest.raises(ValueError, match="finite"):
        decide_promotion({"map": float("nan")}, {"map": 1.0}, "map", 0.5)


def test_models_uris_parse_and_bad_ones_name_the_form():
    assert parse_models_uri("models:/cvnet-global@champion") == ("cvnet-global", "champion", None)
    assert parse_models_uri("models:/cvnet-rerank/12") == ("cvnet-rerank", None, "12")
    for bad in ("models:/cvnet-global", "models:/a/b/c", "models:/x@"):
        with pytest.raises(ValueError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
            parse_models_uri(bad)


# ----------------------------------------------------------------------------- on the mlflow server

def _encoded(seed: int, shape=(96, 128, 3)) -> bytes:
    image = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", image)  # lossless: the reference decodes the same pixels
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory):
    """A synthetic-weight CVNet checkpoint logged once as each kind of pyfunc model."""
    import mlflow

    from cvnet.models.checkpoints import save_checkpoint
    from cvnet.models.cvnet import CVNet
    from cvnet.models.synthetic_weights import synthetic_state_dict
    from cvnet.pyfunc import log_cvnet_model

    mlflow.set_tracking_uri(mlflow_server["url"])
    model = CVNet(50)
    model.load_state_dict(synthetic_state_dict("r50", 1))
    checkpoint = str(tmp_path_factory.mktemp("ckpt") / "cvnet.pth")
    save_checkpoint(model, checkpoint)
    experiment = mlflow.set_experiment(f"registry-{uuid.uuid4().hex[:6]}").experiment_id
    with mlflow.start_run(experiment_id=experiment):
        uris = {kind: log_cvnet_model(checkpoint, kind).model_uri for kind in ("global", "rerank")}
    return {"model": model.eval(), "uris": uris, "url": mlflow_server["url"], "checkpoint": checkpoint}


@pytest.mark.slow
def test_plain_mlflow_client_loads_champions_and_predicts(logged, tmp_path):
    from cvnet.registry import aliases, promote, register_model

    for kind in ("global", "rerank"):
        name = f"cvnet-{kind}"  # other tests of this session may have registered versions too
        version = register_model(name, logged["uris"][kind], tags={"eval_medium_map": 10.0})
        promote(name, version, "test: this version")
        assert aliases(name).champion == version
    images = [_encoded(s) for s in range(3)]
    for i, data in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(data)
    script = """
import json, mlflow, pandas as pd
g = mlflow.pyfunc.load_model("models:/cvnet-global@champion")
r = mlflow.pyfunc.load_model("models:/cvnet-rerank@champion")
images = [open(f"{i}.png", "rb").read() for i in range(3)]
X = g.predict(pd.DataFrame({"image": images}))
p = r.predict(pd.DataFrame({"query": [images[0]] * 3, "candidate": images}))
import cvnet
print(json.dumps({"X": X.tolist(), "p": p.tolist(), "cvnet": cvnet.__file__,
                  "inputs": g.metadata.get_input_schema().input_names()}))
"""
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["url"])
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/cvnet/" in out["cvnet"]  # the package came with the model, not from this checkout
    assert out["inputs"] == ["image"]
    model = logged["model"]
    decoded = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in images]
    X = np.array(out["X"], dtype=np.float32)
    assert X.shape == (3, 2048)
    np.testing.assert_allclose(X, model.global_descriptor(decoded), atol=1e-5)
    features = [model.rerank_features(im) for im in decoded]
    expected = model.match_probability(features[0], features)
    np.testing.assert_allclose(np.array(out["p"], dtype=np.float32), expected, atol=1e-5)


def test_load_model_resolves_models_uris_once_per_version(logged, tmp_path, monkeypatch):
    import torch

    from cvnet.models.checkpoints import load_model, load_state
    from cvnet.registry import register_model

    monkeypatch.setenv("CVNET_MODEL_CACHE", str(tmp_path / "cache"))
    name = f"load-{uuid.uuid4().hex[:6]}"
    version = register_model(name, logged["uris"]["global"])
    by_version = load_model(f"models:/{name}/{version}")
    cached = list((tmp_path / "cache" / name).iterdir())
    assert len(cached) == 1 and cached[0].name.startswith(f"{version}-")
    by_alias = load_model(f"models:/{name}@champion")  # first version: champion
    assert len(list((tmp_path / "cache" / name).iterdir())) == 1  # the same download
    reference = load_state(logged["checkpoint"])
    for net in (by_version, by_alias):
        state = net.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    with pytest.raises(Exception, match="challenger|alias"):
        load_model(f"models:/{name}@no-such-alias")


def _register_three(logged) -> tuple[str, list[str]]:
    """A fresh registered model with three versions (metrics as tags)."""
    from cvnet.registry import register_model

    name = f"gate-{uuid.uuid4().hex[:6]}"
    versions = [register_model(name, logged["uris"]["global"], tags={"map": m}) for m in (30.0, 32.0, 31.0)]
    return name, versions


def test_gate_better_promotes_worse_stays_challenger_rollback_restores(logged):
    from mlflow.tracking import MlflowClient

    from cvnet.registry import RegistryError, aliases, gate, rollback

    client = MlflowClient(logged["url"])
    name, (v1, v2, v3) = _register_three(logged)
    start = aliases(name)
    assert (start.champion, start.challenger, start.previous) == (v1, v3, None)  # first one: champion

    better = gate(name, v2, {"map": 32.0}, "map", min_gain=1.0)
    now = aliases(name)
    assert better.promote and (now.champion, now.previous, now.challenger) == (v2, v1, v2)
    assert client.get_model_version(name, v2).tags["cvnet.promoted.reason"] == better.reason
    assert "replaced by version" in client.get_model_version(name, v1).tags["cvnet.demoted.reason"]
    assert gate(name, v2, {"map": 32.0}, "map", 1.0).reason.endswith("already the champion")
    assert aliases(name) == now  # rerunning the gate changes nothing

    worse = gate(name, v3, {"map": 31.0}, "map", min_gain=1.0)  # champion's 32.0 from its tags
    now = aliases(name)
    assert not worse.promote and (now.champion, now.previous, now.challenger) == (v2, v1, v3)
    assert client.get_model_version(name, v3).tags["cvnet.challenger.reason"] == worse.reason

    restored = rollback(name, "test: v2 misbehaves in production")
    assert (restored.champion, restored.previous) == (v1, None)
    assert client.get_model_version(name, v1).tags["cvnet.restored.reason"] == "test: v2 misbehaves in production"
    assert "misbehaves" in client.get_model_version(name, v2).tags["cvnet.rolled_back.reason"]
    with pytest.raises(RegistryError, match=f"no 'previous' version .* cvnet promote {name} VERSION"):
        rollback(name, "again")


def test_cli_promote_and_rollback_record_the_reason(logged, capsys):
    from mlflow.tracking import MlflowClient

    from cvnet.registry import aliases
    from jobs.cli import main

    name, (v1, v2, v3) = _register_three(logged)
    url = logged["url"]
    assert main(["promote", name, v3, "--reason", "hand-picked", "--tracking-uri", url]) == 0
    assert f"champion {v3}, challenger {v3}, previous {v1}" in capsys.readouterr().out
    assert MlflowClient(url).get_model_version(name, v3).tags["cvnet.promoted.reason"] == "hand-picked"
    assert main(["rollback", name, "--reason", "bad night", "--tracking-uri", url]) == 0
    assert aliases(name).champion == v1
    assert main(["rollback", name, "--tracking-uri", url]) == 1  # nothing left to roll back to
    assert main(["promote", name, "99", "--tracking-uri", url]) == 1  # unknown version
    assert aliases(name).champion == v1

"""Checkpoint loading and saving: official layouts, our format, ImageNet backbones, bad files."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import cvnet
from cvnet.models.checkpoints import CheckpointError, extractor_sha256, load_imagenet_backbone, save_checkpoint
from cvnet.models.global_net import GlobalNet
from cvnet.models.synthetic_weights import synthetic_state_dict

# torchvision's ResNet-50 names for pycls module paths (written out independently of the loader)
TV_STAGE_BLOCKS = (3, 4, 6, 3)
TV_LEAVES = {"f.a": "conv1", "f.a_bn": "bn1", "f.b": "conv2", "f.b_bn": "bn2", "f.c": "conv3",
             "f.c_bn": "bn3", "proj": "downsample.0", "bn": "downsample.1"}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return synthetic_state_dict("r50", seed=1)


def assert_same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert list(ours) == list(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def torchvision_names(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a pycls trunk (no prefix) to torchvision keys and add a 1000-class ``fc``."""
    out = {}
    for key, value in backbone.items():
        if key.startswith("stem."):
            out[key.replace("stem.conv", "conv1").replace("stem.bn", "bn1")] = value
            continue
        m = re.fullmatch(r"s(\d)\.b(\d+)\.(f\.\w+|proj|bn)\.(\w+)", key)
        stage, block, module, leaf = m.groups()
        out[f"layer{stage}.{int(block) - 1}.{TV_LEAVES[module]}.{leaf}"] = value
    out["fc.weight"] = torch.zeros(1000, 2048)
    out["fc.bias"] = torch.zeros(1000)
    return out


def trunk_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("encoder_q."): v for k, v in state.items()
            if k.startswith("encoder_q.") and not k.startswith("encoder_q.head.")}


def test_bare_state_dict_file_loads_strictly(state, workdir):
    path = workdir / "CVPR2022_CVNet_R50.pyth"
    torch.save(state, path)
    model = cvnet.load_model(str(path))
    assert model.depth == 50 and not model.training
    assert model.encoder_q.s3.b1.f.b.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_state(model, state)


def test_wrapped_and_globalmodel_prefixed_checkpoint_loads(state, workdir):
    renamed = {k.replace("encoder_q.", "globalmodel.", 1): v for k, v in state.items()}
    assert any(k.startswith("globalmodel.") for k in renamed)
    path = workdir / "variant.pyth"
    torch.save({"model_state": renamed, "epoch": 10}, path)
    assert_same_state(cvnet.load_model(path), state)


def test_in_memory_wrapped_state_dict_loads(state):
    assert_same_state(cvnet.load_model({"model_state": state}, depth=50), state)


def test_save_checkpoint_round_trip_is_atomic_and_tagged(state, workdir):
    model = cvnet.load_model(state)
    uri = str(workdir / "ckpt" / "model.pyth")
    save_checkpoint(model, uri, {"experiment": "unit", "epoch": 3})
    raw = torch.load(uri, weights_only=True)
    assert raw["cvnet"] == {"format": 1, "depth": 50, "experiment": "unit", "epoch": 3}
    assert sorted(p.name for p in (workdir / "ckpt").iterdir()) == ["model.pyth"]
    assert_same_state(cvnet.load_model(uri), state)


def test_extractor_hash_ignores_the_reranker_and_sees_the_global_network(state, workdir):
    """A re-ranker fine-tuned on a frozen backbone extracts what its start model extracts."""
    changed = {k: v + 1 if k.startswith("cv_learner.") else v for k, v in state.items()}
    torch.save(state, workdir / "start.pth")
    torch.save(changed, workdir / "fine-tuned.pth")
    assert extractor_sha256(str(workdir / "start.pth")) == extractor_sha256(str(workdir / "fine-tuned.pth"))
    key = next(k for k in state if k.startswith("encoder_q.") and state[k].is_floating_point())
    torch.save({**state, key: state[key] + 1}, workdir / "other-backbone.pth")
    assert extractor_sha256(str(workdir / "start.pth")) != extractor_sha256(str(workdir / "other-backbone.pth"))


def test_extractor_hash_loads_a_file_once_and_sees_it_change(state, workdir, monkeypatch):
    from cvnet.models import checkpoints

    loads, load = [], checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda source: loads.append(source) or load(source))
    path = workdir / "model.pth"
    torch.save(state, path)
    first = extractor_sha256(str(path))
    assert extractor_sha256(str(path)) == extractor_sha256(path) == first and len(loads) == 1
    key = next(k for k in state if k.startswith("encoder_q.") and state[k].is_floating_point())
    torch.save({**state, key: state[key] + 1}, path)  # rewritten in place: size equal, mtime not
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    assert extractor_sha256(str(path)) != first and len(loads) == 2


def test_save_and_load_on_s3(state, s3_bucket):
    model = cvnet.load_model(state)
    uri = f"{s3_bucket}/checkpoints/exp/model.pyth"
    save_checkpoint(model, uri, {"note": "s3"})
    assert_same_state(cvnet.load_model(uri), state)


def test_bad_metadata_is_rejected(state, workdir):
    model = cvnet.load_model(state)
    with pytest.raises(ValueError, match="reserved keys \\['depth'\\]"):
        save_checkpoint(model, str(workdir / "x.pyth"), {"depth": 101})
    with pytest.raises(ValueError, match="JSON-like"):
        save_checkpoint(model, str(workdir / "x.pyth"), {"obj": object()})
    assert not list(workdir.iterdir())


def test_truncated_file_fails_with_a_clear_error(state, workdir):
    path = workdir / "truncated.pyth"
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pyth: not a readable torch checkpoint"):
        cvnet.load_model(str(path))


def test_missing_file_is_named(workdir):
    with pytest.raises(CheckpointError, match=r"nope\.pyth: no such file"):
        cvnet.load_model(str(workdir / "nope.pyth"))
    with pytest.raises(CheckpointError, match="cannot read"):
        cvnet.load_model(workdir)


def test_missing_and_unexpected_keys_are_listed(state):
    broken = dict(state)
    del broken["cv_learner.mlp.2.bias"]
    del broken["encoder_q.s2.b1.proj.weight"]
    broken["encoder_q.head.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        cvnet.load_model(broken)
    err = info.value
    assert err.missing == ["cv_learner.mlp.2.bias", "encoder_q.s2.b1.proj.weight"]
    assert err.unexpected == ["encoder_q.head.extra"]
    assert "missing keys: 2 (cv_learner.mlp.2.bias, encoder_q.s2.b1.proj.weight)" in str(err)
    assert "unexpected keys: 1 (encoder_q.head.extra)" in str(err)


def test_wrong_shapes_and_depth_are_reported(state):
    broken = dict(state, **{"encoder_q.head.fc.bias": torch.zeros(512)})
    with pytest.raises(CheckpointError, match=r"encoder_q\.head\.fc\.bias \(512,\) \(model \(2048,\)\)"):
        cvnet.load_model(broken)
    with pytest.raises(CheckpointError, match=r"missing keys: \d+ \(encoder_q\.s3\.b10"):
        cvnet.load_model(state, depth=101)
    with pytest.raises(CheckpointError, match="cannot infer the ResNet depth"):
        cvnet.load_model({"fc.weight": torch.zeros(2, 2)})


def test_torchvision_backbone_loads_and_keeps_head(state):
    tv = torchvision_names(trunk_of(state))
    assert tuple(tv["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(tv["layer4.2.bn3.running_var"].shape) == (2048,)
    net = GlobalNet(50)
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    load_imagenet_backbone(net, tv)
    ours = net.state_dict()
    for key, value in trunk_of(state).items():
        assert torch.equal(ours[key], value), key
    assert all(torch.equal(net.head.state_dict()[k], v) for k, v in head_before.items())


def test_pycls_backbone_file_loads_without_batch_counters(state, workdir):
    pycls = {k: v for k, v in trunk_of(state).items() if not k.endswith("num_batches_tracked")}
    pycls["head.fc.weight"] = torch.zeros(1000, 2048)
    path = workdir / "R-50-1x64d_dds_8gpu.pyth"
    torch.save({"model_state": pycls, "epoch": 100}, path)
    net = GlobalNet(50)
    load_imagenet_backbone(net, str(path))
    assert torch.equal(net.s4.b3.f.c.weight, state["encoder_q.s4.b3.f.c.weight"])


def test_incomplete_torchvision_backbone_is_rejected(state):
    tv = torchvision_names(trunk_of(state))
    del tv["layer3.5.conv2.weight"]
    tv["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_imagenet_backbone(GlobalNet(50), tv)
    assert info.value.missing == ["s3.b6.f.b.weight"]
    assert info.value.unexpected == ["layer5.0.conv1.weight"]


def test_importing_cvnet_imports_neither_ray_nor_torch():
    code = "import sys, cvnet; assert 'ray' not in sys.modules and 'torch' not in sys.modules; cvnet.load_model"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rerank_scale_is_kept_in_the_checkpoint_and_used_for_rerank_features(state, workdir):
    model = cvnet.load_model(state)
    assert model.rerank_scale == 1.0
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert model.rerank_features(image).size == (3, 4)
    model.rerank_scale = 2.0
    uri = str(workdir / "scaled.pth")
    save_checkpoint(model, uri, {"stage": "rerank"})
    assert torch.load(uri, weights_only=True)["cvnet"]["rerank_scale"] == 2.0
    loaded = cvnet.load_model(uri)
    assert loaded.rerank_scale == 2.0
    scaled = loaded.rerank_features(image)
    assert scaled.size == (6, 8)  # the stage-3 map of the image resized to 96 x 128
    upscaled = cv2.resize(image, (128, 96), interpolation=cv2.INTER_LINEAR)
    loaded.rerank_scale = 1.0
    assert all(np.array_equal(a, b) for a, b in zip(scaled.levels, loaded.rerank_features(upscaled).levels))
    with pytest.raises(ValueError, match="reserved keys \\['rerank_scale'\\]"):
        save_checkpoint(model, str(workdir / "x.pth"), {"rerank_scale": 3.0})

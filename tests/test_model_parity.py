"""CVNet numerics against the reference outputs (golden_r50_seed0.npz), through the public API.

Tolerances from the parity README: descriptors 2e-5 max abs; feature maps
1e-4 * max(1, max|ref|); scores 1e-5.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cvnet
from cvnet.data.images import crop_query
from cvnet.models.cvnet import CVNet
from cvnet.models.rerank import RerankFeatures
from cvnet.models.synthetic_weights import read_layout, synthetic_state_dict

PARITY = Path(__file__).resolve().parent / "fixtures" / "parity"
SCALES = (0.7071, 1.0, 1.4142)
DESC_TOL = 2e-5
SCORE_TOL = 1e-5
PAIRS = [("q_crop", "a"), ("q_crop", "b"), ("a", "b")]


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(PARITY / "golden_r50_seed0.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def images(golden) -> dict[str, np.ndarray]:
    return {"a": golden["image_a"], "b": golden["image_b"],
            "q_crop": crop_query(golden["image_q"], golden["query_bbx"])}


@pytest.fixture(scope="module")
def model() -> CVNet:
    torch.set_num_threads(2)
    return cvnet.load_model(synthetic_state_dict("r50", seed=0))


@pytest.mark.parametrize("depth,layout", [(50, "cvnet_r50_state_dict.tsv"), (101, "cvnet_r101_state_dict.tsv")])
def test_state_dict_names_shapes_and_order_match_reference(depth, layout):
    reference = [(key, shape) for key, shape, _ in read_layout(PARITY / layout)]
    ours = [(key, tuple(t.shape)) for key, t in CVNet(depth).state_dict().items()]
    assert ours == reference


@pytest.mark.parametrize("name", ["r50", "r101"])
def test_packaged_layouts_equal_reference_fixtures(name):
    assert read_layout(name) == read_layout(PARITY / f"cvnet_{name}_state_dict.tsv")


def test_synthetic_weights_follow_recipe_and_seed():
    first, again, other = (synthetic_state_dict("r50", s) for s in (0, 0, 1))
    assert list(first) == [key for key, _, _ in read_layout("r50")]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["encoder_q.head.fc.weight"], other["encoder_q.head.fc.weight"])
    assert first["encoder_q.s1.b1.bn.num_batches_tracked"].dtype == torch.int64
    p = first["encoder_q.head.pool.p"]
    assert p.dtype == torch.float32 and 3.0 <= float(p) <= 3.5
    assert float(first["encoder_q.s3.b6.f.c_bn.weight"].max()) <= 0.3
    # the first draw of the stream is the stem conv: uniform on +-sqrt(6 / (3*7*7))
    rng = np.random.default_rng(0)
    bound = np.sqrt(6.0 / 147)
    expected = (-bound + 2 * bound * rng.random((64, 3, 7, 7))).astype(np.float32)
    assert np.array_equal(first["encoder_q.stem.conv.weight"].numpy(), expected)


def test_multiscale_descriptors_match_reference(model, images, golden):
    names = ["a", "b", "q_crop", "a"]  # mixed sizes, and one size twice (batched together)
    desc = model.global_descriptor([images[n] for n in names], scales=SCALES)
    assert desc.shape == (4, 2048) and desc.dtype == np.float32
    for row, name in zip(desc, names):
        assert np.abs(row - golden[f"global_{name}"]).max() <= DESC_TOL, name
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("scale_index", [0, 1, 2])
def test_single_scale_descriptors_match_reference(model, images, golden, scale_index):
    desc = model.global_descriptor([images["b"]], scales=(SCALES[scale_index],))
    assert np.abs(desc[0] - golden[f"global_b_scale{scale_index}"]).max() <= DESC_TOL


def test_feature_maps_match_reference(model, images, golden):
    for name, image in images.items():
        ref = golden[f"featmap_{name}"]
        got = model.feature_map(image)
        assert got.shape == ref.shape == (1024, -(-image.shape[0] // 16), -(-image.shape[1] // 16))
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), name


def test_match_probabilities_match_reference(model, images, golden):
    features = {name: model.rerank_features(image) for name, image in images.items()}
    for q, k in PAIRS:
        score = model.match_probability(features[q], [features[k]])
        assert score.shape == (1,)
        assert abs(float(score[0]) - float(golden[f"score_{q}_{k}"])) <= SCORE_TOL, (q, k)
    many = model.match_probability(features["q_crop"], [features["a"], features["b"]])
    expected = [golden["score_q_crop_a"], golden["score_q_crop_b"]]
    np.testing.assert_allclose(many, expected, rtol=0, atol=SCORE_TOL)
    restored = RerankFeatures.from_bytes(features["b"].to_bytes())
    assert abs(float(model.match_probability(features["a"], [restored])[0])
               - float(golden["score_forward_a_b"][0])) <= SCORE_TOL
    bf16 = model.match_probability(features["q_crop"], [features["a"], features["b"]],
                                   precision="bf16")  # the opt-in approximate mode
    assert np.abs(bf16 - np.array(expected)).max() < 1e-2


def test_inference_uses_eval_mode_and_restores_training(model, images, golden):
    model.train()
    try:
        desc = model.global_descriptor([images["a"]], scales=(1.0,))
        assert model.training and model.encoder_q.s1.b1.bn.training
    finally:
        model.eval()
    assert np.abs(desc[0] - golden["global_a_scale1"]).max() <= DESC_TOL


def test_bad_images_are_named(model, images):
    with pytest.raises(ValueError, match="image 1: expected an HxWx3 uint8"):
        model.global_descriptor([images["a"], images["a"].astype(np.float32)])
    with pytest.raises(ValueError, match="image 0: empty"):
        model.global_descriptor([np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 0: expected"):
        model.feature_map(images["a"][:, :, 0])
    with pytest.raises(ValueError, match=r"image 1: size \(1, 1\) is empty after resizing by scale 0.3"):
        model.global_descriptor([images["a"], np.zeros((1, 1, 3), np.uint8)], scales=(1.0, 0.3))
    assert model.global_descriptor([]).shape == (0, 2048)


def test_r101_loads_synthetic_weights_strictly_and_runs():
    state = synthetic_state_dict("r101", seed=0)
    model = cvnet.load_model(state)
    assert model.depth == 101 and not model.training
    assert torch.equal(model.state_dict()["encoder_q.s3.b23.f.c.weight"], state["encoder_q.s3.b23.f.c.weight"])
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    desc = model.global_descriptor([image], scales=(1.0,))
    assert desc.shape == (1, 2048) and np.isfinite(desc).all()
    assert abs(float(np.linalg.norm(desc[0])) - 1.0) < 1e-5
    assert model.feature_map(image).shape == (1024, 3, 3)


def test_bf16_is_opt_in_and_close(model, images, golden):
    desc = model.global_descriptor([images["a"], images["b"]], scales=(1.0,), precision="bf16")
    assert desc.dtype == np.float32
    between_images = np.abs(golden["global_a_scale1"] - golden["global_b_scale1"]).max()
    for row, name in zip(desc, ["a", "b"]):
        error = np.abs(row - golden[f"global_{name}_scale1"]).max()
        assert error < 2e-3 and error < 0.1 * between_images, name
    with pytest.raises(ValueError, match="precision"):
        model.global_descriptor([images["a"]], precision="fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_matches_reference(images, golden):
    """The same checks as the CPU tests above, on CUDA (TF32 must stay off for fp32)."""
    model = cvnet.load_model(synthetic_state_dict("r50", seed=0), device="cuda")
    desc = model.global_descriptor(list(images.values()))
    for row, name in zip(desc, images):
        assert np.abs(row - golden[f"global_{name}"]).max() <= DESC_TOL, name
    ref = golden["featmap_a"]
    assert np.abs(model.feature_map(images["a"]) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())

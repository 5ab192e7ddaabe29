"""CVNet-Rerank: reference correlation, fast exact path and RerankFeatures against the golden fixture."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvnet.models.checkpoints import submodule_state
from cvnet.models.conv4d import CenterPivotConv4d, GroupNorm4d
from cvnet.models.correlation import correlation_4d, correlation_slices, pyramid_sizes, resize_bilinear, resize_leading
from cvnet.models.rerank import (
    CVLearner,
    RerankFeatures,
    compute_rerank_features,
    make_conv2ds,
    match_probability,
    match_probability_reference,
)
from cvnet.models.synthetic_weights import read_layout, synthetic_state_dict

PARITY = Path(__file__).resolve().parent / "fixtures" / "parity"
PAIRS = [("q_crop", "a"), ("q_crop", "b"), ("a", "b")]
SCORE_TOL = 1e-5


def _tol(reference: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(reference).max()))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the fixture's small tensors gain nothing from more, and on a busy
    shared CPU multi-thread barriers make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def golden():
    with np.load(PARITY / "golden_r50_seed0.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def model():
    state = synthetic_state_dict("r50", seed=0)
    conv2ds, learner = make_conv2ds(), CVLearner()
    conv2ds.load_state_dict(submodule_state(state, "conv2ds."))
    learner.load_state_dict(submodule_state(state, "cv_learner."))
    return conv2ds.eval(), learner.eval()


@pytest.fixture(scope="module")
def maps(golden):
    return {name: torch.from_numpy(golden[f"featmap_{name}"]) for name in ("a", "b", "q_crop")}


@pytest.fixture(scope="module")
def features(maps, model):
    conv2ds, _ = model
    return {name: compute_rerank_features(m, conv2ds) for name, m in maps.items()}


def test_state_dict_names_and_shapes_match_reference_layout():
    expected = {
        key: shape
        for key, shape, _ in read_layout(PARITY / "cvnet_r50_state_dict.tsv")
        if key.startswith(("conv2ds.", "cv_learner."))
    }
    ours = {f"conv2ds.{k}": tuple(v.shape) for k, v in make_conv2ds().state_dict().items()}
    ours |= {f"cv_learner.{k}": tuple(v.shape) for k, v in CVLearner().state_dict().items()}
    assert ours == expected


def test_pyramid_sizes_round_half_to_even():
    # 17 * 0.5 = 8.5 -> 8 and 13 * 0.5 = 6.5 -> 6 (Python round), 15 * 0.5 = 7.5 -> 8
    assert pyramid_sizes(17, 13) == [(8, 6), (12, 9), (17, 13)]
    assert pyramid_sizes(17, 15) == [(8, 8), (12, 11), (17, 15)]


@pytest.mark.parametrize("q,k", PAIRS)
def test_reference_correlation_matches_golden(golden, maps, model, q, k):
    conv2ds, _ = model
    with torch.no_grad():
        corr = correlation_4d(maps[q], maps[k], conv2ds).numpy()
    reference = golden[f"corr_{q}_{k}"]
    assert corr.shape == reference.shape
    assert np.abs(corr - reference).max() <= _tol(reference)


@pytest.mark.parametrize("q,k", PAIRS)
def test_reference_score_matches_golden(golden, maps, model, q, k):
    conv2ds, learner = model
    score = match_probability_reference(learner, conv2ds, maps[q], maps[k])
    assert abs(score - float(golden[f"score_{q}_{k}"])) <= SCORE_TOL


@pytest.mark.parametrize("src,dst", [((24, 32), (48, 64)), ((34, 45), (48, 64)), ((1, 5), (3, 1)), ((6, 6), (6, 6))])
def test_resize_leading_equals_bilinear_align_corners(src, dst):
    maps = torch.randn(2, 7, *src, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(maps, size=dst, mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    # F.interpolate rounds its weights in float32, the matrices are built in float64
    got = resize_leading(maps.permute(0, 2, 3, 1), dst)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5 * float(maps.abs().max()))
    np.testing.assert_allclose(resize_bilinear(maps, dst).permute(0, 2, 3, 1).numpy(), want.numpy(), atol=0)


def test_fast_slices_equal_slices_of_reference_correlation(golden, features):
    for q, k in PAIRS:
        query, key = features[q], features[k]
        key_sub, query_sub = correlation_slices(
            [torch.from_numpy(x)[None] for x in query.levels], [torch.from_numpy(x)[None] for x in key.levels], stride=2
        )
        reference = golden[f"corr_{q}_{k}"]
        want_key_sub = reference[..., ::2, ::2]
        want_query_sub = reference[:, ::2, ::2]
        assert key_sub.shape == (1, *want_key_sub.shape)
        assert query_sub.shape == (1, *want_query_sub.shape)
        assert np.abs(key_sub[0].numpy() - want_key_sub).max() <= _tol(reference)
        assert np.abs(query_sub[0].numpy() - want_query_sub).max() <= _tol(reference)


def test_fast_scores_match_golden_batched_over_mixed_sizes(golden, features, model):
    _, learner = model
    keys = [features["a"], features["b"], features["a"], features["b"]]
    scores = match_probability(learner, features["q_crop"], keys, batch_size=2)
    want = np.array([golden["score_q_crop_a"], golden["score_q_crop_b"]] * 2)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert np.abs(scores - want).max() <= SCORE_TOL
    ab = match_probability(learner, features["a"], [features["b"]])
    assert abs(float(ab[0]) - float(golden["score_a_b"])) <= SCORE_TOL


def test_learner_forward_on_full_tensor_matches_reference_forward(golden):
    torch.manual_seed(0)
    learner = CVLearner()
    corr = torch.from_numpy(golden["corr_a_b"]).unsqueeze(0)
    with torch.no_grad():
        np.testing.assert_allclose(learner(corr).numpy(), learner.forward_reference(corr).numpy(), atol=1e-5)


def test_learner_gradients_match_reference_forward(golden):
    """Stage-2 training backpropagates through the fast layers: same gradients as the reference."""
    torch.manual_seed(0)
    learner = CVLearner()
    corr = torch.from_numpy(golden["corr_q_crop_b"]).unsqueeze(0)
    grads = []
    for forward in (learner, learner.forward_reference):
        learner.zero_grad()
        forward(corr)[0, 1].backward()
        grads.append({k: p.grad.clone() for k, p in learner.named_parameters()})
    for key, grad in grads[0].items():
        np.testing.assert_allclose(grad.numpy(), grads[1][key].numpy(), atol=1e-5, err_msg=key)


def test_fast_slices_backpropagate_to_the_pyramid(features):
    """Stage 2 trains conv2ds through the correlation: the fast slices must be differentiable."""
    levels = [torch.from_numpy(x)[None].requires_grad_() for x in features["a"].levels]
    key_sub, query_sub = correlation_slices(levels, [torch.from_numpy(x)[None] for x in features["b"].levels], stride=2)
    (key_sub.sum() + query_sub.sum()).backward()
    assert all(lvl.grad is not None and lvl.grad.abs().sum() > 0 for lvl in levels)


def test_fast_scores_do_not_depend_on_batch_size(features, model):
    _, learner = model
    keys = [features["a"], features["b"], features["a"]]
    one = match_probability(learner, features["q_crop"], keys, batch_size=1)
    three = match_probability(learner, features["q_crop"], keys, batch_size=3)
    np.testing.assert_allclose(one, three, atol=1e-6)


def test_bf16_mode_is_close_to_fp32(features, model):
    _, learner = model
    keys = [features["a"], features["b"]]
    fp32 = match_probability(learner, features["q_crop"], keys)
    bf16 = match_probability(learner, features["q_crop"], keys, precision="bf16")
    assert np.abs(bf16 - fp32).max() < 1e-2  # measured about 1.3e-3 on this fixture


def test_match_probability_edge_cases(features, model):
    _, learner = model
    assert match_probability(learner, features["a"], []).shape == (0,)
    with pytest.raises(ValueError, match="precision"):
        match_probability(learner, features["a"], [features["b"]], precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        match_probability(learner, features["a"], [features["b"]], batch_size=0)


def _naive_center_pivot(conv: CenterPivotConv4d, x: torch.Tensor) -> torch.Tensor:
    """Loop-by-position definition: conv1 over query dims at strided key positions + conv2 over key dims."""
    s = conv.stride
    b, _, hq, wq, hk, wk = x.shape
    c1, c2 = conv.conv1, conv.conv2
    out = torch.zeros(b, c1.out_channels, -(-hq // s), -(-wq // s), -(-hk // s), -(-wk // s))
    for yk in range(0, hk, s):
        for xk in range(0, wk, s):
            out[..., yk // s, xk // s] += F.conv2d(x[..., yk, xk], c1.weight, c1.bias, s, c1.padding)
    for yq in range(0, hq, s):
        for xq in range(0, wq, s):
            out[:, :, yq // s, xq // s] += F.conv2d(x[:, :, yq, xq], c2.weight, c2.bias, s, c2.padding)
    return out


@pytest.mark.parametrize("kernel,stride", [(5, 2), (3, 1), (3, 2)])
def test_center_pivot_conv_matches_loop_definition(kernel, stride):
    torch.manual_seed(0)
    conv = CenterPivotConv4d(3, 4, kernel, stride)
    x = torch.randn(2, 3, 5, 4, 3, 6)  # odd and even sizes exercise ceil(n / stride)
    with torch.no_grad():
        want = _naive_center_pivot(conv, x).numpy()
        np.testing.assert_allclose(conv(x).numpy(), want, atol=1e-5)
        np.testing.assert_allclose(conv.forward_reference(x).numpy(), want, atol=1e-5)


@pytest.mark.parametrize("channels_innermost", [False, True])
def test_group_norm4d_matches_nn_group_norm(channels_innermost):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 4, 5, 6) * 3 + 1.5
    if channels_innermost:
        x = x.permute(0, 2, 3, 4, 5, 1).contiguous().permute(0, 5, 1, 2, 3, 4)
    ours, reference = GroupNorm4d(4, 8), torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.0)
        ours.bias.uniform_(-0.1, 0.1)
        reference.load_state_dict(ours.state_dict())
        want = reference(x).numpy()
        np.testing.assert_allclose(ours(x).numpy(), want, atol=1e-5)
        ours.inplace = True
        got = ours(x)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
        # in place exactly when the input is channels-innermost contiguous
        assert (got.data_ptr() == x.data_ptr()) == channels_innermost


def test_rerank_features_round_trip_bytes_exactly(features):
    original = features["q_crop"]
    data = original.to_bytes()
    assert isinstance(data, bytes) and not data.startswith(b"\x80")  # not a pickle
    restored = RerankFeatures.from_bytes(data)
    assert restored.size == original.size == (17, 15)
    for got, want in zip(restored.levels, original.levels):
        assert got.dtype == np.float32 and got.flags.writeable
        assert np.array_equal(got, want)


def test_rerank_features_are_unit_normalised_pyramid(features):
    feats = features["b"]
    assert [lvl.shape for lvl in feats.levels] == [(256, h, w) for h, w in pyramid_sizes(17, 13)]
    for level in feats.levels:
        np.testing.assert_allclose(np.linalg.norm(level, axis=0), 1.0, atol=1e-5)


def test_rerank_features_reject_bad_bytes_and_shapes(features):
    data = features["a"].to_bytes()
    with pytest.raises(ValueError, match="length"):
        RerankFeatures.from_bytes(data[:-4])
    with pytest.raises(ValueError, match="magic"):
        RerankFeatures.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="too short"):
        RerankFeatures.from_bytes(b"CV")
    levels = features["a"].levels
    with pytest.raises(ValueError, match="do not form a pyramid"):
        RerankFeatures((levels[0], levels[0], levels[2]))
    with pytest.raises(ValueError, match="level 1 must be"):
        RerankFeatures((levels[0], levels[1].astype(np.float64), levels[2]))
    with pytest.raises(ValueError, match="3 levels"):
        RerankFeatures(levels[:2])
    corrupt = bytearray(data)
    corrupt[-4:] = np.array([np.inf], dtype="<f4").tobytes()
    with pytest.raises(ValueError, match="level 2 has non-finite"):
        RerankFeatures.from_bytes(bytes(corrupt))


def test_compute_rerank_features_rejects_bad_maps(model):
    conv2ds, learner = model
    with pytest.raises(ValueError, match=r"\(1024, h, w\)"):
        compute_rerank_features(torch.zeros(512, 4, 4), conv2ds)
    with pytest.raises(ValueError, match="1x5 is too small"):
        compute_rerank_features(torch.zeros(1024, 1, 5), conv2ds)
    bad = torch.zeros(1024, 4, 4)
    bad[3, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        compute_rerank_features(bad, conv2ds)
    smallest = compute_rerank_features(torch.randn(1024, 2, 2), conv2ds)
    assert [lvl.shape[1:] for lvl in smallest.levels] == [(1, 1), (1, 1), (2, 2)]
    assert np.isfinite(match_probability(learner, smallest, [smallest])).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_scores_on_cuda_match_golden(golden, features, model):
    _, learner = model
    cuda_learner = CVLearner().cuda().eval()
    cuda_learner.load_state_dict(learner.state_dict())
    scores = match_probability(cuda_learner, features["q_crop"], [features["a"], features["b"]])
    want = np.array([golden["score_q_crop_a"], golden["score_q_crop_b"]])
    assert np.abs(scores - want).max() <= SCORE_TOL

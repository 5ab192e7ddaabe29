"""Fast inference paths against the reference structure: each one on its own.

- center-pivot convs as conv3d on every memory layout they accept (views and the copy), the
  second direction added inside its conv at inference; bf16 ReLU through the int16 view;
- correlation slices and match probabilities on odd, unequal map sizes vs
  ``match_probability_reference`` (the step-by-step oracle);
- BatchNorm folded into the backbone convs (inference copy only; training unchanged), with each
  block's ReLUs and residual add fused into its convs;
- bf16 modes within their stated bounds (rerank |dscore| <= 2e-3, descriptors cosine >= 0.9999).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cvnet
from cvnet.models import onednn
from cvnet.models.conv4d import CenterPivotConv4d, channels_innermost, relu_, subsample_key, subsample_query
from cvnet.models.global_net import multiscale_descriptors
from cvnet.models.rerank import (
    CVLearner,
    compute_rerank_features,
    match_probability,
    match_probability_reference,
)
from cvnet.models.resnet import fold_batchnorm
from cvnet.models.synthetic_weights import synthetic_state_dict
from test_rerank import model, one_thread  # noqa: F401  (shared fixtures: the rerank weights, one thread)

SCORE_TOL = 1e-5
DESC_TOL = 2e-5


@pytest.fixture(scope="module")
def cvnet_model():
    return cvnet.load_model(synthetic_state_dict("r50", seed=0))


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same (B, C, hq, wq, hk, wk) values in the memory layouts the fast paths meet."""
    def in_memory(order: tuple[int, ...]) -> torch.Tensor:
        inverse = [order.index(d) for d in range(6)]
        return x.permute(order).contiguous().permute(inverse)

    return {
        "contiguous": x.contiguous(),
        "channels innermost": in_memory((0, 2, 3, 4, 5, 1)),
        "key dims outermost": in_memory((0, 4, 5, 2, 3, 1)),
        "channels outermost": in_memory((1, 0, 2, 3, 4, 5)),
    }


@pytest.mark.parametrize("kernel,stride", [(5, 2), (3, 1), (3, 2)])
def test_center_pivot_conv3d_matches_reference_on_every_layout(kernel, stride):
    torch.manual_seed(0)
    conv = CenterPivotConv4d(3, 4, kernel, stride)
    x = torch.randn(2, 3, 5, 4, 7, 6)
    with torch.no_grad():
        want = conv.forward_reference(x)
        for key_name, key_x in _layouts(x).items():
            for query_name, query_x in _layouts(x).items():
                got = conv.forward_slices(subsample_key(key_x, stride), subsample_query(query_x, stride))
                assert got.shape == want.shape
                np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, err_msg=f"{key_name} / {query_name}")
                assert channels_innermost(got)  # what the next layer convolves without a copy


def _ops_run(fn) -> tuple[torch.Tensor, set[str]]:
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


def test_center_pivot_conv_adds_its_second_direction_inside_the_conv_at_inference_only():
    torch.manual_seed(0)
    conv = CenterPivotConv4d(3, 4, 3, 1)
    x = _layouts(torch.randn(2, 3, 5, 4, 7, 6))["channels innermost"]
    with torch.no_grad():
        fused, inference_ops = _ops_run(lambda: conv(x))
    trained, training_ops = _ops_run(lambda: conv(x))  # autograd: the plain conv and add
    fused_op = "mkldnn::_convolution_pointwise_"
    assert fused_op in inference_ops and fused_op not in training_ops and trained.requires_grad
    np.testing.assert_allclose(fused.numpy(), trained.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(fused.numpy(), conv.forward_reference(x).detach().numpy(), atol=1e-5)


def test_bf16_relu_through_its_int16_view_equals_clamp_and_autograd_keeps_torchs():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).bfloat16()
    x[:3] = torch.tensor([-0.0, float("inf"), -float("inf")])
    got = relu_(x.clone())
    assert torch.equal(got, x.clamp(min=0)) and (got >= 0).all()
    leaf = torch.randn(8, requires_grad=True)
    y = relu_(leaf.bfloat16())  # in autograd: torch's own relu_, which has a gradient
    y.float().sum().backward()
    assert torch.equal(leaf.grad, (leaf > 0).float())


@pytest.mark.parametrize("query_size,key_size", [((17, 13), (11, 15)), ((9, 12), (9, 12))])
def test_fast_match_probability_equals_reference_structure(model, query_size, key_size):
    conv2ds, learner = model
    gen = torch.Generator().manual_seed(1)
    query_map = torch.randn(1024, *query_size, generator=gen)
    key_maps = [torch.randn(1024, *key_size, generator=gen) for _ in range(2)]
    want = [match_probability_reference(learner, conv2ds, query_map, k) for k in key_maps]
    query = compute_rerank_features(query_map, conv2ds)
    got = match_probability(learner, query, [compute_rerank_features(k, conv2ds) for k in key_maps])
    np.testing.assert_allclose(got, want, rtol=0, atol=SCORE_TOL)


def test_bf16_rerank_within_its_bound(model):
    conv2ds, learner = model
    gen = torch.Generator().manual_seed(2)
    maps = [torch.randn(1024, 24, 32, generator=gen) for _ in range(3)]  # the error shrinks with map size
    feats = [compute_rerank_features(m, conv2ds) for m in maps]
    fp32 = match_probability(learner, feats[0], feats[1:])
    bf16 = match_probability(learner, feats[0], feats[1:], precision="bf16")
    assert not np.array_equal(fp32, bf16)  # the mode really ran in bf16
    assert np.abs(bf16 - fp32).max() <= 2e-3


def test_fold_batchnorm_is_exact_and_leaves_the_network_alone(cvnet_model):
    net = cvnet_model.encoder_q
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 53  # R50: stem + 16 blocks x 3 + 4 proj
    assert folded.s2.b1.f.b.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), net.eval()(x).numpy(), atol=1e-6)
        np.testing.assert_allclose(folded.stage3(x).numpy(), net.stage3(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_fused_pointwise_blocks_equal_the_folded_blocks(cvnet_model, memory_format):
    folded = fold_batchnorm(cvnet_model.encoder_q)
    blocks = [m for m in folded.modules() if hasattr(m, "fuse_pointwise")]
    assert len(blocks) == 16 and all(b.fuse_pointwise for b in blocks)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)).to(memory_format=memory_format)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fused = folded.forward_trunk(x)
    assert sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_convolution_pointwise") == 48  # 3 a block
    for block in blocks:
        block.fuse_pointwise = False
    with torch.no_grad():
        plain = folded.forward_trunk(x)
    np.testing.assert_allclose(fused.numpy(), plain.numpy(), atol=1e-5)  # float rounding


def test_folded_copy_follows_weight_changes_and_training_is_unfolded(cvnet_model):
    model = cvnet_model
    image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    first = model.global_descriptor([image], scales=(1.0,))
    folded = model.inference_encoder()
    assert model.inference_encoder() is folded  # cached while nothing changes
    assert "_folded_encoder" not in "".join(model.state_dict())
    original = model.encoder_q.s1.b1.f.a_bn.running_mean.clone()
    try:
        with torch.no_grad():
            model.encoder_q.s1.b1.f.a_bn.running_mean.add_(0.5)  # as a BN update in training would
        changed = model.global_descriptor([image], scales=(1.0,))
        assert model.inference_encoder() is not folded
        with torch.no_grad():
            want = multiscale_descriptors(model.encoder_q.eval(), [image], scales=(1.0,))
        assert np.abs(changed - want).max() <= DESC_TOL
        assert np.abs(changed - first).max() > 1e-4
    finally:
        with torch.no_grad():
            model.encoder_q.s1.b1.f.a_bn.running_mean.copy_(original)
    # training mode still normalises with batch statistics through the real BatchNorm modules
    model.train()
    try:
        batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        model.encoder_q(batch)
        assert model.encoder_q.s1.b1.f.a_bn.num_batches_tracked.item() >= 1
    finally:
        model.eval()


def test_bf16_descriptors_within_their_bound(cvnet_model):
    model = cvnet_model
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 80, 3), dtype=np.uint8) for _ in range(2)]
    fp32 = model.global_descriptor(images)
    bf16 = model.global_descriptor(images, precision="bf16")
    assert not np.array_equal(fp32, bf16)
    assert float((fp32 * bf16).sum(axis=1).min()) >= 0.9999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_paths_match_reference_with_tf32_off(model):
    """fp32 on CUDA with TF32 allowed globally: the fp32 mode must still turn it off in the
    correlation matmuls and the convs; bf16 stays within its bound."""
    conv2ds, learner = model
    gen = torch.Generator().manual_seed(3)
    query_map = torch.randn(1024, 17, 13, generator=gen)
    key_map = torch.randn(1024, 11, 15, generator=gen)
    want = match_probability_reference(learner, conv2ds, query_map, key_map)
    cuda_learner = CVLearner().cuda().eval()
    cuda_learner.load_state_dict(learner.state_dict())
    feats = [compute_rerank_features(m, conv2ds) for m in (query_map, key_map)]
    matmul_before, cudnn_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        fp32 = match_probability(cuda_learner, feats[0], feats[1:])
        bf16 = match_probability(cuda_learner, feats[0], feats[1:], precision="bf16")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_before, cudnn_before
    assert abs(float(fp32[0]) - want) <= SCORE_TOL
    assert abs(float(bf16[0]) - want) <= 2e-3


def test_fused_convs_take_bf16_only_where_onednn_has_bf16_kernels(monkeypatch):
    """Without AVX-512 BW/VL/DQ or AVX-NE-CONVERT oneDNN's bf16 ops raise: the plain convs run."""
    conv, x = nn.Conv2d(4, 4, 3), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert onednn.serves(x.bfloat16(), conv) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        assert not onednn.serves(x.bfloat16(), conv)
        assert onednn.serves(x, conv)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
        assert onednn.serves(x.bfloat16(), conv)

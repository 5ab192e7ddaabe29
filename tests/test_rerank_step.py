"""Stage-2 step: the loss by hand, fast-path gradients equal the reference's, a toy overfit."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cvnet.models.checkpoints import submodule_state
from cvnet.models.correlation import correlation_4d
from cvnet.models.cvnet import CVNet
from cvnet.models.synthetic_weights import synthetic_state_dict
from cvnet.training.rerank_step import (MapBatch, PairScorer, freeze_backbone, pair_loss,
                                        pair_metrics, rerank_step, stage3_maps)
from test_rerank import one_thread  # noqa: F401  (autouse: small tensors run far faster on one thread)


@pytest.fixture(scope="module")
def weights():
    state = synthetic_state_dict("r50", seed=0)
    return {"conv2ds": submodule_state(state, "conv2ds."), "cv_learner": submodule_state(state, "cv_learner.")}


def _scorer(weights) -> PairScorer:
    from cvnet.models.rerank import CVLearner, make_conv2ds

    scorer = PairScorer(make_conv2ds(), CVLearner())
    scorer.conv2ds.load_state_dict(weights["conv2ds"])
    scorer.cv_learner.load_state_dict(weights["cv_learner"])
    return scorer


def _toy_batch(seed=0, size=(8, 8), key_size=None) -> MapBatch:
    """Two anchors, each with a noisy copy (positive) and an unrelated map (negative);
    pairs interleaved across anchors so the scorer must restore pair order."""
    g = torch.Generator().manual_seed(seed)
    key_size = key_size or size
    queries = torch.randn(2, 1024, *size, generator=g)
    resize = lambda x: torch.nn.functional.interpolate(x[None], size=key_size, mode="bilinear")[0]
    keys = torch.stack([resize(queries[0]) + 0.3 * torch.randn(1024, *key_size, generator=g),
                        resize(queries[1]) + 0.3 * torch.randn(1024, *key_size, generator=g),
                        torch.randn(1024, *key_size, generator=g),
                        torch.randn(1024, *key_size, generator=g)])
    return MapBatch(queries, keys, torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 0, 0]))


def _reference_logits(scorer: PairScorer, batch: MapBatch) -> torch.Tensor:
    """Per pair: the full 4D correlation, the learner layer by layer as the reference runs it."""
    return torch.cat([scorer.cv_learner.forward_reference(
        correlation_4d(batch.queries[q], key, scorer.conv2ds).unsqueeze(0))
        for q, key in zip(batch.query_of.tolist(), batch.keys)])


def test_pair_loss_on_hand_computed_logits():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 1])
    # p(match) = 3/4 for a match; p(no match) = 2/3 for a non-match; 1/2 for the tie
    want = -(math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 3
    assert pair_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    metrics = pair_metrics(logits, labels)
    # argmax: pair 0 -> 1 (right), pair 1 -> 0 (right), pair 2 tie -> 0 (wrong)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["pos_accuracy"] == pytest.approx(1 / 2) and metrics["neg_accuracy"] == 1.0
    assert metrics["pos_prob"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert metrics["neg_prob"] == pytest.approx(1 / 3)
    assert math.isnan(pair_metrics(logits[:1], labels[:1])["neg_accuracy"])


@pytest.mark.parametrize("key_size", [(8, 8), (7, 9)])
def test_fast_path_logits_and_gradients_equal_the_reference(weights, key_size):
    """The stage-2 loss through the fast exact path trains conv2ds and cv_learner exactly as
    the reference structure (full 4D correlation, layer-by-layer learner) would."""
    scorer, batch = _scorer(weights), _toy_batch(1, key_size=key_size)
    results = []
    for logits_of in (lambda: scorer(batch.queries, batch.keys, batch.query_of),
                      lambda: _reference_logits(scorer, batch)):
        scorer.zero_grad()
        logits = logits_of()
        pair_loss(logits, batch.labels).backward()
        results.append((logits.detach(), {k: p.grad.clone() for k, p in scorer.named_parameters()}))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    assert set(fast_grads) == set(ref_grads) and any(k.startswith("conv2ds") for k in fast_grads)
    for key, grad in ref_grads.items():
        assert grad.abs().max() > 0, key
        tol = 1e-4 * max(1.0, float(grad.abs().max()))
        np.testing.assert_allclose(fast_grads[key].numpy(), grad.numpy(), atol=tol, err_msg=key)


def test_a_few_steps_overfit_a_toy_batch(weights):
    scorer, batch = _scorer(weights), _toy_batch(2)
    optimizer = torch.optim.Adam(scorer.parameters(), lr=1e-3)
    history = [rerank_step(scorer, optimizer, batch) for _ in range(8)]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["accuracy"] == 1.0
    assert history[-1]["pos_prob"] > 0.5 > history[-1]["neg_prob"]


def test_step_trains_the_models_own_rerank_modules_only(weights):
    torch.manual_seed(0)
    model = CVNet(50)
    model.conv2ds.load_state_dict(weights["conv2ds"])
    model.cv_learner.load_state_dict(weights["cv_learner"])
    backbone = freeze_backbone(model)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    images = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    maps = stage3_maps(backbone, images)
    assert maps.shape == (3, 1024, 8, 8) and maps.dtype == torch.float32 and not maps.requires_grad
    torch.testing.assert_close(maps, backbone.stage3(images))
    bf16 = stage3_maps(backbone, images, precision="bf16")
    assert bf16.dtype == torch.float32 and (bf16 - maps).abs().max() < 0.1 * maps.abs().max()

    scorer = PairScorer.of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(scorer.parameters(), lr=0.1)
    batch = MapBatch(maps[:1], maps[1:], torch.tensor([0, 0]), torch.tensor([1, 0]))
    metrics = rerank_step(scorer, optimizer, batch.hidden(0.3, seed=[0, 1], cell_size=2))
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("conv2ds.", "cv_learner.")) for k in changed)
    assert any(k.startswith("conv2ds.") for k in changed) and any(k.startswith("cv_learner.") for k in changed)


def test_hidden_maps_train_with_finite_gradients(weights):
    """Zero-filled cells give all-zero feature positions: the unit normalisation must not NaN."""
    scorer, batch = _scorer(weights), _toy_batch(3)
    hidden = batch.hidden(0.5, seed=4, cell_size=4, fill="zero")
    assert (hidden.queries == 0).any() and (hidden.keys == 0).any()
    assert not torch.equal(hidden.queries, batch.queries) and not torch.equal(hidden.keys, batch.keys)
    rerank_step(scorer, torch.optim.SGD(scorer.parameters(), lr=0.01), hidden)
    assert all(torch.isfinite(p).all() for p in scorer.parameters())


def test_a_non_finite_loss_stops_the_step(weights):
    scorer, batch = _scorer(weights), _toy_batch(0)
    queries = batch.queries.clone()
    queries[0, 0, 0, 0] = float("nan")
    bad = MapBatch(queries, batch.keys, batch.query_of, batch.labels)
    before = [p.clone() for p in scorer.parameters()]
    with pytest.raises(FloatingPointError, match="stage-2 loss is nan"):
        rerank_step(scorer, torch.optim.SGD(scorer.parameters(), lr=0.1), bad)
    assert all(torch.equal(a, b) for a, b in zip(before, scorer.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu(weights):
    batch = _toy_batch(5)
    cpu, cuda = _scorer(weights), _scorer(weights).cuda()
    want = rerank_step(cpu, torch.optim.SGD(cpu.parameters(), lr=0.1), batch)
    got = rerank_step(cuda, torch.optim.SGD(cuda.parameters(), lr=0.1), batch.to("cuda"))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    for a, b in zip(cpu.parameters(), cuda.parameters()):
        torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=1e-4)


def test_bf16_scorer_is_close_to_fp32(weights):
    batch = _toy_batch(6)
    fp32 = _scorer(weights)
    bf16 = PairScorer(fp32.conv2ds, fp32.cv_learner, precision="bf16")
    with torch.no_grad():
        want = torch.softmax(fp32(batch.queries, batch.keys, batch.query_of), 1)
        got = torch.softmax(bf16(batch.queries, batch.keys, batch.query_of).float(), 1)
    assert (got - want).abs().max() < 1e-2  # measured 2.4e-3 on this batch

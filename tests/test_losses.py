"""Stage-1 losses: hand-computed values, gradient direction, margin behaviour, adaptive t."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cvnet.training.losses import CurricularFaceLoss, CurricularMargin, MomentumContrastiveLoss

M, S = 0.15, 30.0


def _phi(c: float, m: float = M) -> float:
    return c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m)


def _ce(target: float, negatives: list[float], s: float = S) -> float:
    logits = [s * target] + [s * n for n in negatives]
    top = max(logits)
    return -(logits[0] - top) + math.log(sum(math.exp(v - top) for v in logits))


def test_curricular_margin_matches_hand_computation():
    margin = CurricularMargin(M, S, t_alpha=0.01)
    cos = torch.tensor([[0.8, 0.3, 0.9]])
    pos = torch.tensor([[True, False, False]])
    loss = margin(cos, pos, ~pos)
    t = 0.01 * 0.8  # t starts at 0 and moves towards the mean positive cosine first
    hard = 0.9 * (t + 0.9)  # 0.9 > cos(theta + m) = 0.7014: a hard negative, modulated
    assert _phi(0.8) == pytest.approx(0.701354, abs=1e-5)
    assert margin.t.item() == pytest.approx(t)
    assert loss.item() == pytest.approx(_ce(_phi(0.8), [0.3, hard]), rel=1e-5)


def test_margin_zero_without_hard_negatives_is_plain_softmax():
    margin = CurricularMargin(0.0, S)
    cos = torch.tensor([[0.7, 0.1, -0.2], [0.2, 0.6, 0.5]])
    pos = torch.tensor([[True, False, False], [False, True, False]])
    expected = F.cross_entropy(S * cos, torch.tensor([0, 1]))
    assert margin(cos, pos, ~pos).item() == pytest.approx(expected.item(), rel=1e-5)


def test_larger_margin_gives_larger_loss():
    cos = torch.tensor([[0.6, 0.2, 0.1]])
    pos = torch.tensor([[True, False, False]])
    losses = [CurricularMargin(m, S)(cos, pos, ~pos).item() for m in (0.0, 0.1, 0.3)]
    assert losses[0] < losses[1] < losses[2]


def test_target_logit_falls_back_past_pi_minus_margin():
    margin = CurricularMargin(0.5, S)
    c = math.cos(math.pi - 0.2)  # theta + m > pi
    out = margin.target_logit(torch.tensor([c])).item()
    assert out == pytest.approx(c - math.sin(math.pi - 0.5) * 0.5, rel=1e-6)
    assert margin.target_logit(torch.tensor([0.5])).item() == pytest.approx(_phi(0.5, 0.5))


def test_t_is_a_moving_average_of_positive_cosines():
    margin = CurricularMargin(M, S, t_alpha=0.5)
    pos = torch.tensor([[True, False]])
    for c in (0.4, 0.8):
        margin(torch.tensor([[c, 0.0]]), pos, ~pos)
    assert margin.t.item() == pytest.approx(0.5 * (0.5 * 0.4) + 0.5 * 0.8)


def test_classification_gradient_moves_descriptor_towards_its_class():
    torch.manual_seed(0)
    loss_fn = CurricularFaceLoss(dim=8, num_classes=4)
    x = torch.randn(3, 8, requires_grad=True)
    labels = torch.tensor([0, 2, 3])
    w = F.normalize(loss_fn.weight.detach(), dim=1)

    def cosines(v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=1) @ w.t()

    before = cosines(x.detach())
    loss_fn(x, labels).backward()
    after = cosines(x.detach() - 0.05 * x.grad)
    rows = torch.arange(3)
    assert torch.all(after[rows, labels] > before[rows, labels])
    others = torch.ones_like(before, dtype=torch.bool)
    others[rows, labels] = False

    def gap(c: torch.Tensor) -> torch.Tensor:  # target cosine minus the best other class
        return c[rows, labels] - c.masked_fill(~others, -2).max(dim=1).values

    assert torch.all(gap(after) > gap(before))


def test_classification_rejects_label_out_of_range():
    loss_fn = CurricularFaceLoss(dim=4, num_classes=3)
    with pytest.raises(ValueError, match="class index"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 3]))


def test_contrastive_hand_computed_with_two_positives_and_empty_slots():
    loss_fn = MomentumContrastiveLoss(M, S, t_alpha=0.01)
    q = torch.tensor([[1.0, 0.0]])
    angles = [math.acos(0.9), math.acos(0.5), math.acos(0.2), math.acos(0.95)]
    bank = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    bank_labels = torch.tensor([7, 7, 3, -1])  # the last slot is empty: ignored
    loss = loss_fn(q, torch.tensor([7]), bank, bank_labels)
    t = 0.01 * (0.9 + 0.5) / 2
    # positive 0.9: phi = 0.8667; negatives: 0.2 (easy); the other positive is not a negative
    # positive 0.5: phi = 0.4 (approx); negative 0.2 stays easy (0.2 < cos(theta + m))
    expected = (_ce(_phi(0.9), [0.2]) + _ce(_phi(0.5), [0.2])) / 2
    assert loss_fn.margin.t.item() == pytest.approx(t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_without_positives_is_zero_and_keeps_graph():
    loss_fn = MomentumContrastiveLoss()
    q = torch.randn(2, 4, requires_grad=True)
    loss = loss_fn(q, torch.tensor([1, 2]), torch.randn(3, 4), torch.tensor([5, 6, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert q.grad is not None and torch.all(q.grad == 0)
    assert loss_fn.margin.t.item() == 0.0


def test_contrastive_gradient_pulls_positive_pushes_negative():
    loss_fn = MomentumContrastiveLoss()
    q = torch.tensor([[0.6, 0.8, 0.0]], requires_grad=True)
    bank = F.normalize(torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.1]]), dim=1)
    loss_fn(q, torch.tensor([1]), bank, torch.tensor([1, 2])).backward()
    moved = F.normalize(q.detach() - 0.01 * q.grad, dim=1) @ bank.t()
    start = F.normalize(q.detach(), dim=1) @ bank.t()
    assert moved[0, 0] > start[0, 0] and moved[0, 1] < start[0, 1]


@pytest.mark.parametrize("kwargs,match", [({"margin": 2.0}, "margin"), ({"scale": 0}, "scale")])
def test_invalid_margin_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurricularMargin(**kwargs)

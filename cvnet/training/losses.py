"""Stage-1 losses (SPEC §6): CurricularFace classification and the momentum contrastive loss.

Both share one margin form (CurricularFace, Huang et al. 2020). For a positive cosine ``c_p``
the target logit is ``phi(c_p) = cos(theta_p + m)`` (or ``c_p - m * sin(pi - m)`` once
``theta_p + m > pi``); a negative cosine ``c_n`` with ``c_n > cos(theta_p + m)`` is "hard" and
becomes ``c_n * (t + c_n)``; the others stay. ``t`` is a moving average of the positive
cosines, ``t <- (1 - alpha) t + alpha * mean(c_p)``, updated before it is used (as in the
reference CurricularFace code). Logits are scaled by ``s``; the loss is the cross-entropy of
the positive against its negatives, averaged over (query, positive) pairs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cvnet.training.momentum import rank_and_world


def _mean_over_workers(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all DDP workers (itself when not distributed)."""
    _, world = rank_and_world()
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value


class CurricularMargin(nn.Module):
    """The CurricularFace margin and its adaptive ``t`` (a buffer, checkpointed with the module)."""

    def __init__(self, margin: float = 0.15, scale: float = 30.0, t_alpha: float = 0.01):
        super().__init__()
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin: {margin} is outside [0, pi/2)")
        if scale <= 0:
            raise ValueError(f"scale: {scale} must be positive")
        self.margin, self.scale, self.t_alpha = margin, scale, t_alpha
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin
        self.register_buffer("t", torch.zeros(1))

    def cos_plus_margin(self, cos_pos: torch.Tensor) -> torch.Tensor:
        """``cos(theta + m)`` for cosines ``cos_pos = cos(theta)``."""
        sin_pos = torch.sqrt((1.0 - cos_pos * cos_pos).clamp(min=0.0))
        return cos_pos * self.cos_m - sin_pos * self.sin_m

    def target_logit(self, cos_pos: torch.Tensor) -> torch.Tensor:
        """``phi(c) = cos(theta + m)``, with the linear fall-back past ``pi - m``."""
        return torch.where(cos_pos > self.threshold, self.cos_plus_margin(cos_pos),
                           cos_pos - self.mm)

    def forward(self, cos: torch.Tensor, pos_mask: torch.Tensor,
                neg_mask: torch.Tensor) -> torch.Tensor:
        """Loss for cosines ``cos`` (B, N); masks (B, N) bool mark positives and negatives.

        Queries without any positive contribute nothing; with no positive at all the loss is 0
        (still attached to the graph so every DDP worker runs the same backward).
        """
        cos = cos.float().clamp(-1.0, 1.0)
        rows, cols = pos_mask.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return cos.sum() * 0.0
        cos_pos = cos[rows, cols]
        with torch.no_grad():
            mean_pos = _mean_over_workers(cos_pos.detach().mean())
            self.t.mul_(1.0 - self.t_alpha).add_(self.t_alpha * mean_pos)
        target = self.target_logit(cos_pos)
        negs = cos[rows]
        hard = negs > self.cos_plus_margin(cos_pos).detach()[:, None]
        negs = torch.where(hard, negs * (self.t + negs), negs)
        negs = negs.masked_fill(~neg_mask[rows], float("-inf"))
        logits = self.scale * torch.cat([target[:, None], negs], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(rows))


class CurricularFaceLoss(nn.Module):
    """CurricularFace classification over ``num_classes`` landmarks (weights ``W``: C x D)."""

    def __init__(self, dim: int, num_classes: int, margin: float = 0.15, scale: float = 30.0,
                 t_alpha: float = 0.01):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes: {num_classes}; need at least 2 landmarks")
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)
        self.margin = CurricularMargin(margin, scale, t_alpha)

    def forward(self, descriptors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of (B, D) descriptors against their class indices (B,)."""
        num_classes = self.weight.shape[0]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels: class index outside [0, {num_classes})")
        cos = F.normalize(descriptors.float(), dim=1) @ F.normalize(self.weight, dim=1).t()
        pos = F.one_hot(labels, num_classes).bool()
        return self.margin(cos, pos, ~pos)


class MomentumContrastiveLoss(nn.Module):
    """Queries against a labelled bank of momentum descriptors: same label = positive.

    Bank entries with label ``-1`` (empty queue slots) are neither positive nor negative.
    """

    def __init__(self, margin: float = 0.15, scale: float = 30.0, t_alpha: float = 0.01):
        super().__init__()
        self.margin = CurricularMargin(margin, scale, t_alpha)

    def forward(self, queries: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor,
                bank_labels: torch.Tensor) -> torch.Tensor:
        """Loss of (B, D) queries with labels (B,) against a bank (N, D) with labels (N,)."""
        cos = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).t()
        valid = (bank_labels >= 0)[None, :]
        same = labels[:, None] == bank_labels[None, :]
        return self.margin(cos, same & valid, ~same & valid)

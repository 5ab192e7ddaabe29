"""One stage-2 optimisation step: the re-ranker learns match / no-match of feature-map pairs.

The backbone is frozen (:func:`freeze_backbone`: eval mode, no gradients); :func:`stage3_maps`
computes the stage-3 maps under ``no_grad`` (bf16 autocast allowed), or they come from a cache.
Only the model's ``conv2ds`` and ``cv_learner`` train, through :class:`PairScorer`: the fast
exact correlation path of :mod:`cvnet.models.rerank` (pyramid levels, the two strided slices,
``CVLearner.forward_slices``) with gradients. Its loss is the cross-entropy of the 2-way
logits against the pair label (1 = same landmark), averaged over pairs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvnet.models.correlation import correlation_slices, pyramid_levels
from cvnet.models.cvnet import CVNet
from cvnet.models.precision import precision_context
from cvnet.models.rerank import CVLearner
from cvnet.training.hide_and_seek import Fill, hide_and_seek


def freeze_backbone(model: CVNet) -> nn.Module:
    """Freeze ``model.encoder_q`` (no gradients, eval-mode BatchNorm); returns it."""
    return model.encoder_q.requires_grad_(False).eval()


@torch.no_grad()
def stage3_maps(backbone: nn.Module, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Float32 pre-ReLU stage-3 maps (B, 1024, ceil(H/16), ceil(W/16)) of normalised images
    (B, 3, H, W) on the backbone's device; ``precision="bf16"`` runs the backbone in autocast."""
    with precision_context(images.device, precision):
        return backbone.stage3(images).float()


@dataclass(frozen=True)
class MapBatch:
    """Stage-2 pairs as maps: ``queries`` (A, C, h, w), ``keys`` (P, C, h, w), ``query_of`` (P,)
    the query of each pair (a CPU int64 tensor), ``labels`` (P,) int64, 1 = same landmark."""

    queries: torch.Tensor
    keys: torch.Tensor
    query_of: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> MapBatch:
        """Maps and labels on ``device`` (``query_of`` stays on the CPU: it drives a loop)."""
        return replace(self, queries=self.queries.to(device), keys=self.keys.to(device),
                       labels=self.labels.to(device))

    def hidden(self, prob: float, seed: int | Sequence[int], cell_size: int | None = None,
               grid: int | None = None, fill: Fill = "zero") -> MapBatch:
        """Hide-and-Seek on every query and key map, with independent masks per map."""
        seed = [seed] if isinstance(seed, int) else list(seed)
        return replace(self, queries=hide_and_seek(self.queries, prob, [*seed, 0], cell_size, grid, fill),
                       keys=hide_and_seek(self.keys, prob, [*seed, 1], cell_size, grid, fill))


class PairScorer(nn.Module):
    """Match / no-match logits (P, 2) of (query map, key map) pairs through the fast exact path.

    Holds the model's own ``conv2ds`` and ``cv_learner`` (the same modules, not copies), so
    training it trains the model; it is the module DDP wraps in stage 2. ``precision``: exact
    ``"fp32"`` (TF32 off on CUDA) or the approximate opt-in ``"bf16"`` (autocast).
    """

    def __init__(self, conv2ds: nn.ModuleList, cv_learner: CVLearner, precision: str = "fp32"):
        super().__init__()
        self.conv2ds, self.cv_learner, self.precision = conv2ds, cv_learner, precision

    @classmethod
    def of(cls, model: CVNet, precision: str = "fp32") -> PairScorer:
        return cls(model.conv2ds, model.cv_learner, precision)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor,
                query_of: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits of pair ``p`` = (``queries[query_of[p]]``, ``keys[p]``), in pair order."""
        query_of = torch.as_tensor(query_of).cpu()
        if query_of.shape != (len(keys),):
            raise ValueError(f"PairScorer: query_of has shape {tuple(query_of.shape)}, "
                             f"expected ({len(keys)},)")
        with precision_context(keys.device, self.precision):
            return self._logits(queries, keys, query_of)

    def _logits(self, queries: torch.Tensor, keys: torch.Tensor, query_of: torch.Tensor) -> torch.Tensor:
        query_levels = pyramid_levels(queries, self.conv2ds)
        key_levels = pyramid_levels(keys, self.conv2ds)
        stride = self.cv_learner.first_stride
        key_subs, query_subs, order = [], [], []
        for q in torch.unique(query_of).tolist():  # one query against all its keys at once
            rows = torch.nonzero(query_of == q)[:, 0]
            rows_on = rows.to(keys.device)
            key_sub, query_sub = correlation_slices([lvl[q:q + 1] for lvl in query_levels],
                                                    [lvl[rows_on] for lvl in key_levels], stride)
            key_subs.append(key_sub)
            query_subs.append(query_sub)
            order.append(rows)
        logits = self.cv_learner.forward_slices(torch.cat(key_subs), torch.cat(query_subs))
        return logits[torch.argsort(torch.cat(order)).to(logits.device)]


def pair_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (P, 2) logits against labels (P,) (1 = match, 0 = no match)."""
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def pair_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy (all, positives, negatives) and mean match probability of positives / negatives.

    A class absent from the batch gets NaN for its entries."""
    prob = torch.softmax(logits.float(), dim=1)[:, 1]
    correct = (logits.argmax(dim=1) == labels).float()
    pos, neg = labels == 1, labels == 0
    nan = float("nan")
    return {
        "accuracy": correct.mean().item(),
        "pos_accuracy": correct[pos].mean().item() if pos.any() else nan,
        "neg_accuracy": correct[neg].mean().item() if neg.any() else nan,
        "pos_prob": prob[pos].mean().item() if pos.any() else nan,
        "neg_prob": prob[neg].mean().item() if neg.any() else nan,
    }


def rerank_step(scorer: nn.Module, optimizer: torch.optim.Optimizer, batch: MapBatch,
                clip_grad_norm: float | None = None) -> dict[str, float]:
    """One step on ``batch``: loss, backward, optional global-norm clipping, optimizer step.

    ``scorer`` is a :class:`PairScorer` or its DDP wrapper. Returns the loss, the gradient norm
    before clipping and :func:`pair_metrics`.
    """
    with precision_context(batch.keys.device, "fp32"):  # the backward without TF32 on CUDA too
        logits = scorer(batch.queries, batch.keys, batch.query_of)
        loss = pair_loss(logits, batch.labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage-2 loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    trainable = [p for p in scorer.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip_grad_norm or float("inf"))
    optimizer.step()
    return {"loss": loss.item(), "grad_norm": float(grad_norm),
            **pair_metrics(logits.detach(), batch.labels)}

"""One stage-1 optimisation step, the model it trains, and its checkpointable state (no Ray).

The trained module is :class:`Stage1Model` (global network + CurricularFace class weights), the
one DDP wraps. The momentum encoder, its labelled queue and the contrastive loss's ``t`` live
beside it: each worker updates its copies identically (gathered keys), so they stay in sync.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cvnet.models.resnet import STAGES
from cvnet.training.losses import CurricularFaceLoss, MomentumContrastiveLoss
from cvnet.training.momentum import (LabelledQueue, MomentumEncoder, gather_from_workers,
                                     shuffled_keys)

class Stage1Model(nn.Module):
    """The global network ``net`` and the classification loss over its descriptors."""

    def __init__(self, net: nn.Module, dim: int, num_classes: int, margin: float, scale: float,
                 t_alpha: float):
        super().__init__()
        self.net = net
        self.cls_loss = CurricularFaceLoss(dim, num_classes, margin, scale, t_alpha)

    def forward(self, images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        descriptors = self.net(images)
        return descriptors, self.cls_loss(descriptors, labels)


def freeze_stages(net: nn.Module, stages: int) -> list[nn.Module]:
    """Freeze the stem and ``s1..s<stages>`` (0: nothing); returns the frozen modules.

    Frozen modules keep eval-mode BatchNorm (see :func:`set_train_mode`).
    """
    if not 0 <= stages <= 4:
        raise ValueError(f"freeze_stages: {stages} is outside [0, 4]")
    frozen = [getattr(net, name) for name in STAGES[:stages + 1]] if stages else []
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: Iterable[nn.Module]) -> None:
    """``model.train()`` with the frozen modules (their BatchNorm statistics) in eval mode."""
    model.train()
    for module in frozen:
        module.eval()


@torch.no_grad()
def center_head(net: nn.Module, images: torch.Tensor) -> None:
    """Set the whitening bias to ``-W mean(GeM(images))`` (net in its current mode): descriptors
    start centred instead of sharing one dominant direction, which a randomly initialised trunk
    produces and plain SGD on the bias removes only very slowly."""
    pooled = net.head.pool(net.forward_trunk(images)).float()
    net.head.fc.bias.copy_(-net.head.fc.weight @ pooled.mean(dim=0))


def build_optimizer(model: Stage1Model, lr: float, head_lr_mult: float, momentum: float,
                    weight_decay: float) -> torch.optim.SGD:
    """SGD; the whitening FC, GeM ``p`` and class weights get ``lr * head_lr_mult``."""
    head_ids = {id(p) for p in [*model.net.head.parameters(), *model.cls_loss.parameters()]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in head_ids], "lr": lr},
        {"params": [p for p in trainable if id(p) in head_ids], "lr": lr * head_lr_mult},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def warmup_cosine(warmup_steps: int, max_steps: int):
    """Multiplier for LambdaLR: linear warm-up, then cosine decay to 0 at ``max_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class Stage1State:
    """Everything a stage-1 step changes; ``model`` may be the DDP wrapper."""

    model: nn.Module
    momentum: MomentumEncoder
    queue: LabelledQueue
    con_loss: MomentumContrastiveLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    resumed_from: list[int] = field(default_factory=list)

    @property
    def core(self) -> Stage1Model:
        """The unwrapped :class:`Stage1Model`."""
        return getattr(self.model, "module", self.model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.core.state_dict(),
            "momentum": self.momentum.state_dict(),
            "queue": self.queue.state_dict(),
            "con_loss": self.con_loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "resumed_from": list(self.resumed_from),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; records the step it resumes from."""
        missing = {"model", "momentum", "queue", "con_loss", "optimizer", "scheduler",
                   "step"} - set(state)
        if missing:
            raise KeyError(f"stage-1 checkpoint: missing {sorted(missing)}")
        self.core.load_state_dict(state["model"])
        self.momentum.load_state_dict(state["momentum"])
        self.queue.load_state_dict(state["queue"])
        self.con_loss.load_state_dict(state["con_loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.resumed_from = [*state.get("resumed_from", []), self.step]


def train_step(state: Stage1State, queries: torch.Tensor, keys: torch.Tensor,
               labels: torch.Tensor, lambda_cls: float, lambda_con: float,
               bf16: bool = False, clip_grad_norm: float | None = None) -> dict[str, float]:
    """One step: losses, backward, SGD + schedule, EMA update, enqueue of gathered keys.

    ``clip_grad_norm`` rescales the (all-reduced) gradient to at most that global norm; a
    randomly initialised trunk starts with gradient norms in the hundreds, which otherwise
    throw the first steps far off. The returned ``grad_norm`` is the norm before clipping.
    """
    device_type = queries.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        descriptors, loss_cls = state.model(queries, labels)
        key_desc = shuffled_keys(state.momentum, keys, seed=state.step).float()
    key_labels = gather_from_workers(labels)
    bank = torch.cat([key_desc, state.queue.descriptors])
    bank_labels = torch.cat([key_labels, state.queue.labels])
    loss_con = state.con_loss(descriptors, labels, bank, bank_labels)
    loss = lambda_cls * loss_cls + lambda_con * loss_con
    if not torch.isfinite(loss):
        raise FloatingPointError(f"step {state.step}: loss is {loss.item()}")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainable = [p for p in state.model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip_grad_norm or float("inf"))
    state.optimizer.step()
    lr = state.optimizer.param_groups[0]["lr"]
    state.scheduler.step()
    state.momentum.update(state.core.net)
    state.queue.enqueue(key_desc, key_labels)
    state.step += 1
    return {"loss": loss.item(), "loss_cls": loss_cls.item(), "loss_con": loss_con.item(),
            "lr": lr, "grad_norm": float(grad_norm), "t_cls": state.core.cls_loss.margin.t.item(),
            "t_con": state.con_loss.margin.t.item()}


def build_global_net(depth: int, init_seed: int, backbone_init: str | None = None) -> nn.Module:
    """The starting global network: torch's default init under ``init_seed`` (deterministic),
    then the ImageNet trunk from ``backbone_init`` when given (the head keeps its init)."""
    from cvnet.models.checkpoints import load_imagenet_backbone
    from cvnet.models.global_net import GlobalNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        net = GlobalNet(depth)
    if backbone_init:
        load_imagenet_backbone(net, backbone_init)
    return net


def build_stage1(net: nn.Module, num_classes: int, loss: dict[str, Any], optim: dict[str, Any],
                 freeze: int) -> tuple[Stage1State, list[nn.Module]]:
    """A fresh :class:`Stage1State` around ``net`` (``loss`` / ``optim``: the config sections)
    and the frozen modules."""
    dim = net.head.fc.out_features
    frozen = freeze_stages(net, freeze)
    model = Stage1Model(net, dim, num_classes, loss["margin"], loss["scale"], loss["t_alpha"])
    optimizer = build_optimizer(model, optim["lr"], optim["head_lr_mult"], optim["momentum"],
                                optim["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(optim["warmup_steps"], optim["max_steps"]))
    state = Stage1State(
        model=model, momentum=MomentumEncoder(net, loss["momentum"]),
        queue=LabelledQueue(loss["queue_size"], dim),
        con_loss=MomentumContrastiveLoss(loss["margin"], loss["scale"], loss["t_alpha"]),
        optimizer=optimizer, scheduler=scheduler)
    return state, frozen

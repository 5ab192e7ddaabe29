"""The momentum encoder (EMA of the global network) and its labelled FIFO queue (SPEC §6)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumEncoder(nn.Module):
    """A frozen copy of a network whose weights follow it as an exponential moving average."""

    def __init__(self, online: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: {momentum} is outside [0, 1]")
        self.momentum = momentum
        self.encoder = copy.deepcopy(online)
        for param in self.encoder.parameters():
            param.requires_grad_(False)

    def follow_modes(self, online: nn.Module) -> None:
        """Give every submodule of the copy the train/eval mode of its online twin, so keys and
        queries see the same BatchNorm behaviour (batch statistics where the online network
        trains, running statistics in frozen parts), as in MoCo."""
        for m_k, m_q in zip(self.encoder.modules(), online.modules(), strict=True):
            m_k.training = m_q.training

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """``p_k <- eta p_k + (1 - eta) p_q`` for parameters; buffers are copied."""
        for p_k, p_q in zip(self.encoder.parameters(), online.parameters(), strict=True):
            p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)
        for b_k, b_q in zip(self.encoder.buffers(), online.buffers(), strict=True):
            b_k.copy_(b_q)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


class LabelledQueue(nn.Module):
    """A FIFO ring of ``size`` descriptors with their labels; empty slots have label -1."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue_size: {size} must be at least 1")
        self.register_buffer("descriptors", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    @torch.no_grad()
    def enqueue(self, descriptors: torch.Tensor, labels: torch.Tensor) -> None:
        """Write a batch after the newest entries, overwriting the oldest (wrap-around)."""
        if descriptors.shape[0] != labels.shape[0]:
            raise ValueError(f"enqueue: {descriptors.shape[0]} descriptors but "
                             f"{labels.shape[0]} labels")
        n = descriptors.shape[0]
        if n > self.size:  # only the newest ``size`` entries survive anyway
            descriptors, labels = descriptors[-self.size:], labels[-self.size:]
            self.ptr.add_(n - self.size).remainder_(self.size)
            n = self.size
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.descriptors[slots] = descriptors.detach().to(self.descriptors.dtype)
        self.labels[slots] = labels.to(self.labels.dtype)
        self.ptr.add_(n).remainder_(self.size)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def shuffled_keys(encoder: MomentumEncoder, keys: torch.Tensor, seed: int) -> torch.Tensor:
    """Momentum descriptors of every worker's keys, (world * B, D) in rank order.

    Under DDP the keys are shuffled across workers before the encoder runs and unshuffled after
    (MoCo's "shuffling BN"): otherwise a worker's BatchNorm normalises its own keys together
    with its own queries, and the contrastive loss learns to tell this worker's keys (the
    positives) from the other workers' by their batch statistics instead of by content. The
    permutation comes from ``seed`` (the step), so every worker draws the same one.
    """
    rank, world = rank_and_world()
    if world == 1:
        return encoder(keys)
    everyone = gather_from_workers(keys)
    order = torch.randperm(everyone.shape[0], generator=torch.Generator().manual_seed(seed))
    mine = order[rank * keys.shape[0]:(rank + 1) * keys.shape[0]].to(keys.device)
    shuffled = gather_from_workers(encoder(everyone[mine]).contiguous())
    out = torch.empty_like(shuffled)
    out[order.to(out.device)] = shuffled
    return out


def gather_from_workers(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all DDP workers, in rank order."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)

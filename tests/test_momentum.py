"""Momentum encoder (EMA) and the labelled FIFO queue."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cvnet.training.momentum import LabelledQueue, MomentumEncoder, gather_from_workers


def _rows(values: list[float]) -> torch.Tensor:
    return torch.tensor(values)[:, None].repeat(1, 2)


def test_queue_fifo_order_and_wrap_around():
    queue = LabelledQueue(size=5, dim=2)
    assert torch.all(queue.labels == -1)
    queue.enqueue(_rows([1, 2, 3]), torch.tensor([10, 20, 30]))
    assert queue.labels.tolist() == [10, 20, 30, -1, -1] and int(queue.ptr) == 3
    queue.enqueue(_rows([4, 5, 6]), torch.tensor([40, 50, 60]))
    # 6 overwrote the oldest entry (1) in slot 0; the pointer wrapped to slot 1
    assert queue.labels.tolist() == [60, 20, 30, 40, 50] and int(queue.ptr) == 1
    assert queue.descriptors[:, 0].tolist() == [6, 2, 3, 4, 5]


def test_queue_batch_larger_than_queue_keeps_the_newest():
    queue = LabelledQueue(size=3, dim=2)
    queue.enqueue(_rows([1]), torch.tensor([1]))
    queue.enqueue(_rows([2, 3, 4, 5, 6]), torch.tensor([2, 3, 4, 5, 6]))
    # as if written one by one from slot 1: 2,3 -> slots 1,2; 4,5,6 -> slots 0,1,2
    assert queue.labels.tolist() == [4, 5, 6] and int(queue.ptr) == 0
    reference = LabelledQueue(size=3, dim=2)
    for v in (1, 2, 3, 4, 5, 6):
        reference.enqueue(_rows([v]), torch.tensor([v]))
    assert queue.labels.tolist() == reference.labels.tolist()
    assert int(queue.ptr) == int(reference.ptr)


def test_queue_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="2 descriptors but 3 labels"):
        LabelledQueue(4, 2).enqueue(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))


def test_queue_state_round_trips():
    queue = LabelledQueue(size=4, dim=2)
    queue.enqueue(_rows([1, 2, 3]), torch.tensor([1, 2, 3]))
    copy = LabelledQueue(size=4, dim=2)
    copy.load_state_dict(queue.state_dict())
    copy.enqueue(_rows([9]), torch.tensor([9]))
    assert copy.labels.tolist() == [1, 2, 3, 9]


def test_ema_update_and_buffers():
    online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = MomentumEncoder(online, momentum=0.9)
    assert all(not p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(1.0)
        for p in ema.encoder.parameters():
            p.fill_(0.0)
        online[1].running_mean.fill_(3.0)
    ema.update(online)
    for p in ema.encoder.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.1))
    ema.update(online)
    for p in ema.encoder.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.9 * 0.1 + 0.1))
    assert torch.all(ema.encoder[1].running_mean == 3.0)


def test_ema_follows_the_online_modes_and_has_no_grad():
    online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    ema = MomentumEncoder(online, momentum=0.5)
    online.train()
    online[2].eval()  # a frozen part
    ema.follow_modes(online)
    assert [m.training for m in ema.encoder] == [True, True, False]
    out = ema(torch.randn(3, 2))
    assert not out.requires_grad


def test_momentum_out_of_range_is_named():
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(nn.Linear(1, 1), momentum=1.5)


def test_gather_is_identity_without_distributed():
    x = torch.arange(4.0)
    assert gather_from_workers(x) is x


class _BatchTag(nn.Module):
    """Per sample: its own two values plus the mean of column 0 over the batch it was encoded in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x[:, :1].mean(0, keepdim=True).expand(x.shape[0], 1)], dim=1)


def _shuffle_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from cvnet.training.momentum import shuffled_keys

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        keys = torch.stack([torch.full((8,), float(rank)), rank * 8 + torch.arange(8.0)], dim=1)
        torch.save(shuffled_keys(MomentumEncoder(_BatchTag()), keys, seed=3), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shuffled_keys_mix_workers_and_restore_rank_order(tmp_path):
    """Under 2-process gloo DDP every worker gets all keys back in rank order, but each worker's
    encoder batch mixed both workers' keys (shuffling BN), identically on both workers."""
    import torch.multiprocessing as mp

    from conftest import free_port

    mp.spawn(_shuffle_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    out0, out1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(out0, out1)
    expected = torch.stack([torch.repeat_interleave(torch.tensor([0.0, 1.0]), 8), torch.arange(16.0)], 1)
    assert torch.equal(out0[:, :2], expected)  # every key once, in rank order
    assert all(0.0 < m < 1.0 for m in out0[:, 2].tolist())  # each encoder batch held both workers' keys


def test_shuffled_keys_without_distributed_is_the_encoder():
    from cvnet.training.momentum import shuffled_keys

    keys = torch.randn(4, 2)
    encoder = MomentumEncoder(_BatchTag())
    assert torch.equal(shuffled_keys(encoder, keys, seed=0), encoder(keys))

"""Hide-and-Seek on feature maps: cell geometry, hidden fraction, determinism, fills."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cvnet.training.hide_and_seek import cell_index, hide_and_seek, hide_mask


def _maps(b=3, c=4, h=8, w=8, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)) + 3.0


def test_cells_of_a_cell_size_are_hidden_whole():
    mask = hide_mask(50, 8, 8, 0.5, seed=1, cell_size=4)
    cells = mask.reshape(50, 2, 4, 2, 4)
    assert (cells == cells[:, :, :1, :, :1]).all()  # constant on each 4x4 cell
    assert 0 < mask.mean() < 1
    # 3-position cells on an 8-wide map: the last cell is 2 wide
    assert cell_index(8, cell_size=3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    mask = hide_mask(200, 8, 8, 0.5, seed=2, cell_size=3)
    assert (mask[:, :, 6] == mask[:, :, 7]).all() and (mask[:, :, 5] != mask[:, :, 6]).any()


def test_grid_gives_that_many_cells_per_side():
    assert cell_index(8, grid=4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert cell_index(8, grid=3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    mask = hide_mask(100, 16, 16, 0.5, seed=0, grid=4)
    np.testing.assert_array_equal(mask, hide_mask(100, 16, 16, 0.5, seed=0, cell_size=4))
    distinct = {tuple(m.ravel()) for m in mask[:, ::4, ::4]}
    assert len(distinct) > 50  # 16 independent cells per map


@pytest.mark.parametrize("prob", [0.1, 0.3, 0.7])
def test_hidden_fraction_matches_probability(prob):
    mask = hide_mask(4000, 8, 8, prob, seed=[7, 3], cell_size=2)  # 64,000 cells
    assert abs(mask.mean() - prob) < 0.01
    per_map = mask.mean(axis=(1, 2))
    assert per_map.std() > 0  # cells, hence maps, differ


def test_masks_are_deterministic_per_seed():
    a = hide_mask(10, 8, 8, 0.5, seed=[0, 5], cell_size=2)
    np.testing.assert_array_equal(a, hide_mask(10, 8, 8, 0.5, seed=[0, 5], cell_size=2))
    assert (a != hide_mask(10, 8, 8, 0.5, seed=[0, 6], cell_size=2)).any()
    maps = _maps()
    torch.testing.assert_close(hide_and_seek(maps, 0.5, 3, cell_size=2),
                               hide_and_seek(maps, 0.5, 3, cell_size=2), rtol=0, atol=0)


@pytest.mark.parametrize("fill", ["zero", "mean", 2.5])
def test_fill_replaces_hidden_positions_only(fill):
    maps = _maps()
    out = hide_and_seek(maps, 0.5, seed=4, cell_size=2, fill=fill)
    mask = torch.from_numpy(hide_mask(3, 8, 8, 0.5, seed=4, cell_size=2))[:, None].expand_as(maps)
    assert mask.any() and (~mask).any()
    want = {"zero": torch.zeros_like(maps), "mean": maps.mean(dim=(2, 3), keepdim=True).expand_as(maps),
            2.5: torch.full_like(maps, 2.5)}[fill]
    torch.testing.assert_close(out[mask], want[mask])
    torch.testing.assert_close(out[~mask], maps[~mask], rtol=0, atol=0)
    assert not torch.equal(out, maps)


def test_probability_zero_and_one():
    maps = _maps()
    assert torch.equal(hide_and_seek(maps, 0.0, 0, cell_size=2), maps)
    assert torch.equal(hide_and_seek(maps, 1.0, 0, cell_size=2, fill=-1.0), torch.full_like(maps, -1.0))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one of cell_size and grid"):
        hide_mask(1, 8, 8, 0.5, 0)
    with pytest.raises(ValueError, match="exactly one of cell_size and grid"):
        hide_mask(1, 8, 8, 0.5, 0, cell_size=2, grid=2)
    with pytest.raises(ValueError, match="prob: 1.2"):
        hide_mask(1, 8, 8, 1.2, 0, cell_size=2)
    with pytest.raises(ValueError, match="cell_size: 0"):
        hide_mask(1, 8, 8, 0.5, 0, cell_size=0)
    with pytest.raises(ValueError, match="fill: 'noise'"):
        hide_and_seek(_maps(), 0.5, 0, cell_size=2, fill="noise")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        hide_and_seek(torch.zeros(4, 8, 8), 0.5, 0, cell_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_mask_on_cuda():
    maps = _maps()
    cpu = hide_and_seek(maps, 0.5, 9, cell_size=2, fill="mean")
    torch.testing.assert_close(hide_and_seek(maps.cuda(), 0.5, 9, cell_size=2, fill="mean").cpu(), cpu)

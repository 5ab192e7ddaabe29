"""Hide-and-Seek (Singh & Lee, ICCV 2017) on stage-3 feature maps, as CVNet's stage 2 uses it.

Each map (C, H, W) is cut into a grid of cells; every cell is hidden independently with
probability ``prob`` and its positions are set to the fill. A stage-3 position covers a 16x16
image patch, so hiding cells of the map hides image regions without recomputing the backbone:
maps can come from a frozen backbone under ``no_grad`` or from a cache. The mask is drawn with
numpy from ``seed``, so it is the same on every device and a pure function of the seed.

The grid is given either by ``cell_size`` (cells of that many positions per side, starting at
the top-left corner; the last row / column of cells may be smaller) or by ``grid`` (that many
cells per side: position ``y`` of ``H`` falls in cell ``floor(y * grid / H)``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

FILLS = ("zero", "mean")
Fill = str | float


def cell_index(size: int, cell_size: int | None = None, grid: int | None = None) -> np.ndarray:
    """The cell (0-based) of each of ``size`` positions along one side."""
    if (cell_size is None) == (grid is None):
        raise ValueError("hide_and_seek: give exactly one of cell_size and grid")
    if cell_size is not None:
        if cell_size < 1:
            raise ValueError(f"hide_and_seek.cell_size: {cell_size} must be >= 1")
        return np.arange(size) // cell_size
    if grid < 1:
        raise ValueError(f"hide_and_seek.grid: {grid} must be >= 1")
    return np.arange(size) * grid // size


def hide_mask(batch: int, height: int, width: int, prob: float, seed: int | Sequence[int],
              cell_size: int | None = None, grid: int | None = None) -> np.ndarray:
    """(batch, height, width) bool mask, True where hidden; cells hidden with ``prob``."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"hide_and_seek.prob: {prob} is outside [0, 1]")
    rows = cell_index(height, cell_size, grid)
    cols = cell_index(width, cell_size, grid)
    hidden = np.random.default_rng(seed).random((batch, rows[-1] + 1, cols[-1] + 1)) < prob
    return hidden[:, rows[:, None], cols[None, :]]


def fill_values(maps: torch.Tensor, fill: Fill) -> torch.Tensor:
    """What hidden positions become, broadcastable to (B, C, H, W): 0, each map's per-channel
    spatial mean (``"mean"``), or a constant."""
    if fill == "zero":
        return maps.new_zeros(())
    if fill == "mean":
        return maps.mean(dim=(-2, -1), keepdim=True)
    if isinstance(fill, str):
        raise ValueError(f"hide_and_seek.fill: {fill!r} is not one of {FILLS} or a number")
    return maps.new_full((), float(fill))


def hide_and_seek(maps: torch.Tensor, prob: float, seed: int | Sequence[int],
                  cell_size: int | None = None, grid: int | None = None,
                  fill: Fill = "zero") -> torch.Tensor:
    """``maps`` (B, C, H, W) with the cells of :func:`hide_mask` set to the fill (a new tensor)."""
    if maps.dim() != 4:
        raise ValueError(f"hide_and_seek: maps must be (B, C, H, W), got {tuple(maps.shape)}")
    b, _, h, w = maps.shape
    mask = torch.from_numpy(hide_mask(b, h, w, prob, seed, cell_size, grid)).to(maps.device)
    return torch.where(mask[:, None], fill_values(maps, fill), maps)

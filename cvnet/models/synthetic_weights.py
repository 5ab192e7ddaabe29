"""Deterministic synthetic CVNet weights (the recipe of the parity fixtures).

``rng = numpy.random.default_rng(seed)``; walk the layout in order and draw
``lo + (hi - lo) * rng.random(shape)`` (float64, cast to float32) per key, with the range
chosen by the key's name; ``num_batches_tracked`` draws nothing and is int64 zero. The
layouts (key, shape, dtype of the reference state dict) ship in ``cvnet/models/layouts/``.
"""
from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch

LAYOUTS = ("r50", "r101")
LayoutRow = tuple[str, tuple[int, ...], str]


def layout_text(layout: str | Path) -> str:
    """The text of a packaged layout (``"r50"``, ``"r101"``) or of a layout file path."""
    if isinstance(layout, str) and layout in LAYOUTS:
        return resources.files("cvnet.models").joinpath("layouts", f"{layout}.tsv").read_text()
    path = Path(layout)
    if not path.is_file():
        raise FileNotFoundError(f"layout {layout!r} is neither one of {LAYOUTS} nor a file")
    return path.read_text()


def read_layout(layout: str | Path) -> list[LayoutRow]:
    """``(key, shape, dtype)`` rows of a layout, in the reference state-dict order."""
    rows = []
    for n, line in enumerate(layout_text(layout).splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"layout {layout}: line {n} is not 'key<TAB>shape<TAB>dtype': {line!r}")
        key, shape, dtype = parts
        rows.append((key, tuple(int(d) for d in shape.split(",") if d), dtype))
    return rows


def value_range(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """The uniform ``(lo, hi)`` range of the recipe for ``key``."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_mean" or leaf == "bias":
        return -0.1, 0.1
    if leaf == "running_var":
        return 0.5, 1.5
    if leaf == "p":
        return 3.0, 3.5
    if leaf == "weight" and len(shape) == 1:
        return (0.1, 0.3) if key.endswith("c_bn.weight") else (0.5, 1.0)
    if leaf == "weight":
        bound = math.sqrt(6.0 / math.prod(shape[1:]))
        return -bound, bound
    raise ValueError(f"synthetic weights: no rule for key {key!r}")


def synthetic_state_dict(layout: str | Path, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic weights for ``layout`` (``"r50"``, ``"r101"`` or a tsv path), by ``seed``."""
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape, _dtype in read_layout(layout):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.int64)
            continue
        lo, hi = value_range(key, shape)
        state[key] = torch.from_numpy((lo + (hi - lo) * rng.random(shape)).astype(np.float32))
    return state

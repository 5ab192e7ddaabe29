"""cvnet: CVNet image retrieval (CVPR 2022). ``load_model`` and ``CVNet`` are imported lazily."""
from __future__ import annotations

from typing import Any

__all__ = ["CVNet", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from cvnet.models.checkpoints import load_model

        return load_model
    if name == "CVNet":
        from cvnet.models.cvnet import CVNet

        return CVNet
    raise AttributeError(f"module 'cvnet' has no attribute {name!r}")

"""CVNet-Global (SPEC §2): ResNet trunk -> GeM (learnable p) -> whitening FC -> L2.

``GlobalNet`` keeps the reference module names (``stem``, ``s1..s4``, ``head.pool.p``,
``head.fc``), so it is the ``encoder_q`` of :class:`cvnet.models.cvnet.CVNet` and the network
the stage-1 trainer optimises. :func:`multiscale_descriptors` is the reference multi-scale
inference on BGR uint8 images.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvnet.config import DEFAULT_SCALES
from cvnet.data.images import normalize, resize_for_scale
from cvnet.models.resnet import ResNet

DESCRIPTOR_DIM = 2048
TRUNK_DIM = 2048


class GeM(nn.Module):
    """Generalised mean pooling with a learnable exponent: ``mean(clamp(x, eps) ** p) ** (1/p)``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C), computed in float32."""
        pooled = x.float().clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / self.p)


class GlobalHead(nn.Module):
    """GeM pooling then the whitening ``fc`` (Linear with bias); no normalisation between."""

    def __init__(self, w_in: int = TRUNK_DIM, dim: int = DESCRIPTOR_DIM):
        super().__init__()
        self.pool = GeM()
        self.fc = nn.Linear(w_in, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


class GlobalNet(ResNet):
    """The global network: ``forward(x)`` maps normalised (B, 3, H, W) to L2-normalised (B, dim)."""

    def __init__(self, depth: int = 50, dim: int = DESCRIPTOR_DIM):
        super().__init__(depth)
        self.head = GlobalHead(TRUNK_DIM, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.forward_trunk(x)).float(), p=2, dim=1)


def check_image(image: np.ndarray, index: int) -> None:
    """Raise ValueError naming ``index`` unless ``image`` is a non-empty HxWx3 uint8 array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        kind = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image {index}: expected an HxWx3 uint8 BGR array, got {kind}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image {index}: empty image of shape {image.shape}")


def to_batch(images: Sequence[np.ndarray], device: torch.device | str) -> torch.Tensor:
    """Same-size BGR uint8 images -> normalised float32 (B, 3, H, W) on ``device``."""
    return torch.from_numpy(np.stack([normalize(im) for im in images])).to(device)


@torch.no_grad()
def descriptors_at_scale(net: GlobalNet, images: Sequence[np.ndarray], scale: float,
                         batch_size: int = 8) -> torch.Tensor:
    """L2-normalised descriptors (N, dim) of ``images`` resized by ``scale``, on the CPU.

    Images of the same resized shape run together in batches of up to ``batch_size``; the
    others run one by one (batching same-size inputs is exact).
    """
    device = next(net.parameters()).device
    for i, im in enumerate(images):
        if round(im.shape[0] * scale) < 1 or round(im.shape[1] * scale) < 1:
            raise ValueError(f"image {i}: size {im.shape[:2]} is empty after resizing by scale {scale}")
    resized = [resize_for_scale(im, scale) for im in images]
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, im in enumerate(resized):
        groups[im.shape].append(i)
    out = torch.empty((len(images), net.head.fc.out_features), dtype=torch.float32)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            out[chunk] = net(to_batch([resized[i] for i in chunk], device)).cpu()
    return out


@torch.no_grad()
def multiscale_descriptors(net: GlobalNet, images: Sequence[np.ndarray],
                           scales: Sequence[float] = DEFAULT_SCALES, batch_size: int = 8) -> np.ndarray:
    """Reference multi-scale descriptors: mean of per-scale L2-normalised descriptors, L2-normalised.

    ``images`` are HxWx3 uint8 BGR arrays of any sizes; returns (N, dim) float32. Put ``net``
    in eval mode first (:meth:`CVNet.global_descriptor` does).
    """
    if not scales:
        raise ValueError("scales must not be empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, im in enumerate(images):
        check_image(im, i)
    if not images:
        return np.zeros((0, net.head.fc.out_features), dtype=np.float32)
    per_scale = torch.stack([descriptors_at_scale(net, images, s, batch_size) for s in scales])
    return F.normalize(per_scale.mean(dim=0), p=2, dim=1).numpy()

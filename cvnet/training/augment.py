"""Training augmentation on BGR uint8 images: random-resized crop and horizontal flip."""
from __future__ import annotations

import math

import cv2
import numpy as np


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A crop covering ``scale`` of the area with aspect in ``ratio``, resized to size x size.

    Falls back to the largest centred square when ten draws do not fit (as torchvision does).
    """
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"random_resized_crop: expected a non-empty HxWxC image, got {image.shape}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop_scale: {scale} must satisfy 0 < lo <= hi <= 1")
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            break
    else:
        h = w = min(height, width)
        y, x = (height - h) // 2, (width - w) // 2
    crop = image[y:y + h, x:x + w]
    interpolation = cv2.INTER_AREA if h * w > size * size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror left-right with probability ``p``."""
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < p else image


def training_view(image: np.ndarray, size: int, rng: np.random.Generator,
                  scale: tuple[float, float], flip: bool) -> np.ndarray:
    """One augmented view: random-resized crop to ``size``, then an optional random flip."""
    view = random_resized_crop(image, size, rng, scale)
    return random_flip(view, rng) if flip else view

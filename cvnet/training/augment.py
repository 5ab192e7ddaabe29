"""Training augmentation on BGR uint8 images: random-resized crop, perspective, horizontal flip."""
from __future__ import annotations

import math

import cv2
import numpy as np


def crop_box(height: int, width: int, rng: np.random.Generator,
             scale: tuple[float, float] = (0.25, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(y, x, h, w)`` of a crop covering ``scale`` of the area with aspect in ``ratio``.

    Falls back to the largest centred square when ten draws do not fit (as torchvision does).
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop_scale: {scale} must satisfy 0 < lo <= hi <= 1")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        perspective: float = 0.0) -> np.ndarray:
    """A crop of :func:`crop_box` resized to size x size; with ``perspective`` > 0, seen in a
    random perspective (:func:`perspective_homography`)."""
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"random_resized_crop: expected a non-empty HxWxC image, got {image.shape}")
    box = crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    if perspective:
        return cv2.warpPerspective(image, perspective_homography(box, size, rng, perspective),
                                   (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    y, x, h, w = box
    interpolation = cv2.INTER_AREA if h * w > size * size else cv2.INTER_LINEAR
    return cv2.resize(image[y:y + h, x:x + w], (size, size), interpolation=interpolation)


def perspective_homography(box: tuple[int, int, int, int], size: int, rng: np.random.Generator,
                           strength: float) -> np.ndarray:
    """The 3x3 map from the image onto size x size that takes ``box`` (``y, x, h, w``) with
    each corner moved inwards by up to ``strength`` of its width and height to the output's
    corners: a perspective view of the box, with no pixel from outside it."""
    if not 0 <= strength < 0.5:
        raise ValueError(f"perspective: {strength} must be in [0, 0.5)")
    y, x, h, w = box
    inward = rng.uniform(0, strength, size=(4, 2)) * (w, h)
    corners = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)
    source = corners + inward * [[1, 1], [-1, 1], [-1, -1], [1, -1]]
    target = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
    return cv2.getPerspectiveTransform(source.astype(np.float32), target.astype(np.float32))


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror left-right with probability ``p``."""
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < p else image


def training_view(image: np.ndarray, size: int, rng: np.random.Generator,
                  scale: tuple[float, float], flip: bool, perspective: float = 0.0) -> np.ndarray:
    """One augmented view: random-resized crop to ``size`` (with a random perspective of up to
    ``perspective``), then an optional random flip."""
    view = random_resized_crop(image, size, rng, scale, perspective=perspective)
    return random_flip(view, rng) if flip else view

"""Image decoding and the reference preprocessing (OpenCV, BGR).

Preprocessing facts (SPEC §2): images are BGR uint8 as ``cv2.imread`` returns them; a scale
``s`` resizes the uint8 image with ``cv2.resize(im, (0, 0), fx=s, fy=s)`` using ``INTER_AREA``
for ``s < 1`` and ``INTER_LINEAR`` for ``s > 1`` (``s == 1`` keeps it); then float32, CHW,
``/255`` and per-channel ``(x - mean) / std`` in BGR order.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# BGR-ordered ImageNet statistics
MEAN_BGR = np.array([0.406, 0.456, 0.485], dtype=np.float32)
STD_BGR = np.array([0.225, 0.224, 0.229], dtype=np.float32)


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the image and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 BGR uint8 array (as ``cv2.imread`` would)."""
    if not data:
        raise ImageDecodeError(name, "empty file")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageDecodeError(name, "not a decodable image")
    return image


def resize_for_scale(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize a uint8 BGR image by ``scale`` following the reference interpolation rules."""
    if scale == 1.0:
        return image
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, (0, 0), fx=scale, fy=scale, interpolation=interpolation)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 BGR -> float32 3xHxW, ``(x / 255 - mean) / std``."""
    x = image.astype(np.float32) / 255.0
    x = (x - MEAN_BGR) / STD_BGR
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def crop_query(image: np.ndarray, bbx: Sequence[float]) -> np.ndarray:
    """Crop a revisitop query to ``bbx = [x1, y1, x2, y2]`` by ``int()`` truncation."""
    x1, y1, x2, y2 = (int(v) for v in bbx)
    return image[y1:y2, x1:x2]

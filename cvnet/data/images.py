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


DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb guard: 100 megapixels
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) do not
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the image and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first JPEG frame header, ``None`` if there is none."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF and i + 9 <= len(data):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def image_size(data: bytes) -> tuple[str, tuple[int, int] | None]:
    """The format and ``(width, height)`` read from the header (``None`` when not found).

    Formats: ``jpeg``, ``png``, ``webp``, ``gif``, ``bmp``; anything else is ``other``.
    """
    if data.startswith(_JPEG_MAGIC):
        return "jpeg", _jpeg_size(data)
    if data.startswith(_PNG_MAGIC):
        ok = len(data) >= 24 and data[12:16] == b"IHDR"
        return "png", (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) if ok else None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", _webp_size(data) if len(data) >= 30 else None
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return "gif", (int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little"))
    if data[:2] == b"BM" and len(data) >= 26:
        return "bmp", (abs(int.from_bytes(data[18:22], "little", signed=True)),
                       abs(int.from_bytes(data[22:26], "little", signed=True)))
    return "other", None


def _check_complete(kind: str, data: bytes, name: str) -> None:
    """Refuse truncated JPEG/PNG files, which OpenCV would decode as a grey-padded image."""
    if kind == "jpeg":
        # FF D9 / FF DA never occur inside entropy-coded data, so an intact file has an
        # end-of-image marker after its last start-of-scan.
        last_scan = data.rfind(b"\xff\xda")
        if last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0:
            raise ImageDecodeError(name, "truncated JPEG (no end-of-image marker after the last scan)")
    elif kind == "png" and data.rfind(b"IEND") < 0:
        raise ImageDecodeError(name, "truncated PNG (no IEND chunk)")


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 BGR uint8 array, as ``cv2.imread`` would.

    The format is taken from the bytes, not the name; grayscale and CMYK images come out as
    BGR and the EXIF orientation is applied (OpenCV's ``IMREAD_COLOR``). Empty, truncated or
    undecodable data and images over ``max_pixels`` raise :class:`ImageDecodeError` naming
    ``name``. The pixel limit is checked from the header, before any pixel is decoded, for
    JPEG, PNG, WebP, GIF and BMP; other formats (TIFF, ...) are checked after decoding, within
    OpenCV's own limit (``OPENCV_IO_MAX_IMAGE_PIXELS``).
    """
    if not data:
        raise ImageDecodeError(name, "empty file")
    kind, size = image_size(data)
    if kind != "other" and size is None:
        raise ImageDecodeError(name, f"corrupt {kind.upper()}: no readable image size in the header")
    if size is not None:
        width, height = size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(name, f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(name, f"{width}x{height} = {width * height} pixels exceeds the "
                                         f"limit of {max_pixels} (decompression bomb?)")
    _check_complete(kind, data, name)
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageDecodeError(name, f"OpenCV could not decode it: {exc}") from exc
    if image is None:
        raise ImageDecodeError(name, "not a decodable image")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageDecodeError(name, f"{image.shape[1]}x{image.shape[0]} pixels exceeds the limit "
                                     f"of {max_pixels}")
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

"""Decoding robustness: every odd input gives the image cv2.imread gives, or a typed error."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cvnet.data.images import ImageDecodeError, decode_image, image_size


def _picture(h: int = 40, w: int = 60) -> np.ndarray:
    image = np.full((h, w, 3), 128, np.uint8)
    image[:10, :20] = (255, 0, 0)     # blue block top-left (BGR)
    image[-10:, -20:] = (0, 0, 255)   # red block bottom-right
    return image


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an EXIF APP1 segment holding one Orientation tag (little-endian TIFF)."""
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
            + struct.pack("<HHII", 0x0112, 3, 1, orientation) + struct.pack("<I", 0))
    return jpeg[:2] + _app1(b"Exif\x00\x00" + tiff) + jpeg[2:]


def _imread(tmp: Path, data: bytes, name: str = "x.jpg") -> np.ndarray:
    path = tmp / name
    path.write_bytes(data)
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def test_grayscale_jpeg_becomes_bgr(workdir):
    data = _jpeg(_picture()[:, :, 2])
    image = decode_image(data, "gray.jpg")
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2])
    assert np.array_equal(image, _imread(workdir, data))


def test_cmyk_jpeg_decodes_to_the_right_colours(workdir):
    buffer = io.BytesIO()
    Image.fromarray(_picture()[:, :, ::-1]).convert("CMYK").save(buffer, "JPEG", quality=95)
    image = decode_image(buffer.getvalue(), "cmyk.jpg")
    assert np.array_equal(image, _imread(workdir, buffer.getvalue()))
    assert np.abs(image[5, 5].astype(int) - (255, 0, 0)).max() < 16
    assert np.abs(image[35, 50].astype(int) - (0, 0, 255)).max() < 16


def test_png_behind_a_jpg_name_is_exact():
    picture = _picture()
    data = cv2.imencode(".png", picture)[1].tobytes()
    assert np.array_equal(decode_image(data, "really_a_png.jpg"), picture)
    deep = cv2.imencode(".png", picture.astype(np.uint16) * 257)[1].tobytes()
    assert np.array_equal(decode_image(deep, "16bit.png"), picture)


@pytest.mark.parametrize("orientation, rotate", [
    (1, None), (3, cv2.ROTATE_180), (6, cv2.ROTATE_90_CLOCKWISE), (8, cv2.ROTATE_90_COUNTERCLOCKWISE)])
def test_exif_orientation_as_imread(workdir, orientation, rotate):
    plain = _jpeg(_picture())
    data = _with_exif_orientation(plain, orientation)
    image = decode_image(data, "exif.jpg")
    assert np.array_equal(image, _imread(workdir, data))
    upright = cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(image, upright if rotate is None else cv2.rotate(upright, rotate))


def test_empty_and_garbage_bytes():
    with pytest.raises(ImageDecodeError, match="^e.jpg: empty file$"):
        decode_image(b"", "e.jpg")
    with pytest.raises(ImageDecodeError, match="g.jpg: not a decodable image"):
        decode_image(b"<html>404</html>", "g.jpg")
    with pytest.raises(ImageDecodeError, match="h.jpg: corrupt JPEG: no readable image size"):
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 40, "h.jpg")


def test_truncated_files_are_refused():
    jpeg = _jpeg(_picture())
    for cut in (3, 200, len(jpeg) // 2, len(jpeg) - 2):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(jpeg[:cut], f"cut{cut}.jpg")
        assert info.value.name == f"cut{cut}.jpg"
        assert "truncated" in info.value.reason or "corrupt" in info.value.reason
    png = cv2.imencode(".png", _picture())[1].tobytes()
    with pytest.raises(ImageDecodeError, match="truncated PNG"):
        decode_image(png[:-20], "cut.png")
    # trailing bytes after the end marker are harmless
    assert decode_image(jpeg + b"\x00garbage", "tail.jpg").shape == (40, 60, 3)


def test_truncation_found_behind_an_exif_thumbnail():
    thumbnail = _jpeg(_picture(8, 8))  # a complete JPEG (with its own end marker) inside APP1
    jpeg = _jpeg(_picture())
    data = jpeg[:2] + _app1(b"Exif\x00\x00" + thumbnail) + jpeg[2:]
    assert decode_image(data).shape == (40, 60, 3)
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(data[:-100], "thumb.jpg")


def test_decompression_bombs_are_refused_from_the_header():
    big = _jpeg(np.zeros((1500, 2000, 3), np.uint8))
    assert image_size(big) == ("jpeg", (2000, 1500))
    with pytest.raises(ImageDecodeError, match=r"big.jpg: 2000x1500 = 3000000 pixels exceeds the limit of 1000000"):
        decode_image(big, "big.jpg", max_pixels=1_000_000)
    assert decode_image(big, "big.jpg").shape == (1500, 2000, 3)
    png = bytearray(cv2.imencode(".png", _picture())[1].tobytes())
    png[16:24] = struct.pack(">II", 60000, 60000)  # header claims 3.6 gigapixels
    with pytest.raises(ImageDecodeError, match="60000x60000 .* exceeds"):
        decode_image(bytes(png), "bomb.png")
    gif = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\xf7\x00\x00" + b"\x00" * 64
    with pytest.raises(ImageDecodeError, match="bomb.gif: 65535x65535 .* exceeds"):
        decode_image(gif, "bomb.gif")


@pytest.mark.parametrize("ext, params, kind", [
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], "webp"),    # lossy VP8
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], "webp"),   # lossless VP8L
    (".bmp", [], "bmp"), (".png", [], "png"), (".jpg", [], "jpeg")])
def test_header_sizes_of_other_formats(ext, params, kind):
    picture = _picture(37, 53)
    data = cv2.imencode(ext, picture, params)[1].tobytes()
    assert image_size(data) == (kind, (53, 37))
    assert decode_image(data, f"x{ext}").shape == (37, 53, 3)
    with pytest.raises(ImageDecodeError, match=f"x{ext}: 53x37 = 1961 pixels exceeds"):
        decode_image(data, f"x{ext}", max_pixels=1000)


def test_corrupted_bytes_never_crash_the_caller():
    jpeg = bytearray(_jpeg(_picture()))
    rng = np.random.default_rng(0)
    for _ in range(60):
        data = bytearray(jpeg)
        for i in rng.integers(2, len(data), size=8):
            data[i] = int(rng.integers(0, 256))
        try:
            image = decode_image(bytes(data), "fuzz.jpg")
        except ImageDecodeError as exc:
            assert exc.name == "fuzz.jpg"
        else:
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8

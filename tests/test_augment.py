"""Training views: crop boxes, the perspective warp, determinism per seed."""
import cv2
import numpy as np
import pytest

from cvnet.training.augment import crop_box, perspective_homography, training_view


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def test_crop_box_inside_the_image_and_its_area_share():
    rng = np.random.default_rng(0)
    for _ in range(200):
        y, x, h, w = crop_box(96, 128, rng, (0.3, 0.8))
        assert 0 <= y and y + h <= 96 and 0 <= x and x + w <= 128
        assert 0.3 * 0.9 <= h * w / (96 * 128) <= 0.8 * 1.1


@pytest.mark.parametrize("strength", [0.0, 0.1, 0.3])
def test_perspective_output_corners_come_from_inside_the_box(strength):
    rng = np.random.default_rng(1)
    for _ in range(50):
        box = crop_box(96, 128, rng, (0.4, 1.0))
        y, x, h, w = box
        inverse = np.linalg.inv(perspective_homography(box, 64, rng, strength))
        out = np.array([[0, 0], [64, 0], [64, 64], [0, 64]], np.float64)
        src = cv2.perspectiveTransform(out[None], inverse)[0]
        inward = np.abs(src - [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]) / (w, h)
        assert inward.max() <= strength + 1e-6
        if strength:
            assert inward.max() > strength / 4  # the corners did move
        assert (src[:, 0] >= x - 1e-6).all() and (src[:, 0] <= x + w + 1e-6).all()
        assert (src[:, 1] >= y - 1e-6).all() and (src[:, 1] <= y + h + 1e-6).all()


def test_perspective_view_is_a_pure_function_of_the_seed():
    image = _image()
    a = training_view(image, 64, np.random.default_rng(7), (0.5, 1.0), True, 0.25)
    b = training_view(image, 64, np.random.default_rng(7), (0.5, 1.0), True, 0.25)
    c = training_view(image, 64, np.random.default_rng(8), (0.5, 1.0), True, 0.25)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_perspective_off_is_the_plain_crop():
    image = _image()
    plain = training_view(image, 64, np.random.default_rng(3), (0.5, 1.0), False)
    warped = training_view(image, 64, np.random.default_rng(3), (0.5, 1.0), False, 0.2)
    assert np.array_equal(plain, training_view(image, 64, np.random.default_rng(3), (0.5, 1.0), False, 0.0))
    assert not np.array_equal(plain, warped)


def test_perspective_out_of_range_is_refused():
    with pytest.raises(ValueError, match="perspective"):
        perspective_homography((0, 0, 10, 10), 8, np.random.default_rng(0), 0.5)

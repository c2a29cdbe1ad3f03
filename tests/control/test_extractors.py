"""Canny edges against OpenCV's cv2.Canny on the same images, bit for bit."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from jdit.control.extractors import canny, canny_condition, to_gray


def _images():
    """A smooth scene with hard shapes, and noise: edges in every direction, ties included."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :128]
    scene = np.zeros((96, 128, 3), np.float64)
    scene[..., 0] = 120 + 80 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    scene[(xx - 40) ** 2 + (yy - 50) ** 2 < 400] = (250, 30, 60)
    scene[20:45, 70:115] = (20, 200, 90)
    scene[np.abs(xx - 100) + np.abs(yy - 70) < 18] = (60, 60, 240)
    noisy = np.clip(scene + rng.normal(0, 12, scene.shape), 0, 255).astype(np.uint8)
    flat = np.full((16, 20, 3), 77, np.uint8)
    steps = np.repeat(np.repeat(rng.integers(0, 4, (6, 8)) * 80, 8, 0), 8, 1)
    return [noisy, scene.astype(np.uint8), flat, np.stack([steps] * 3, -1).astype(np.uint8)]


def test_grey_matches_opencv():
    for image in _images():
        np.testing.assert_array_equal(to_gray(image), cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))


@pytest.mark.parametrize("low, high, l2", [(100, 200, False), (30, 90, False), (50, 51, False),
                                           (20, 60, True), (0, 0, False)])
def test_canny_matches_opencv_bit_for_bit(low, high, l2):
    for image in _images():
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        want = cv2.Canny(grey, low, high, L2gradient=l2)
        got = canny(image, low, high, l2=l2)
        assert got.dtype == np.uint8 and got.shape == grey.shape
        np.testing.assert_array_equal(got, want)
    assert canny(_images()[0], 30, 90).any()  # the scene has edges to find


def test_canny_condition_and_bad_input():
    image = _images()[0]
    cond = canny_condition(image.astype(np.float32) / 255.0, 30, 90)
    assert cond.shape == (96, 128, 3) and set(np.unique(cond)) <= {0.0, 1.0}
    np.testing.assert_array_equal(cond[..., 0] * 255, canny(image, 30, 90))
    with pytest.raises(ValueError, match="low <= high"):
        canny(image, 200, 100)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        canny(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 or floats"):
        canny(np.zeros((8, 8), np.int32))

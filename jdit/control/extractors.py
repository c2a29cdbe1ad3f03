"""Condition extractors that need no network: Canny edges (OpenCV's ``cv2.Canny``, computed the
same way in NumPy, so demos and training data need no OpenCV).

The steps, as OpenCV runs them on an 8-bit image: grey from RGB (OpenCV's fixed-point BT.601
weights); 3x3 Sobel derivatives with replicated borders; the gradient magnitude, |dx| + |dy|
(or dx² + dy² with ``l2=True``, against squared thresholds); non-maximum suppression along the
gradient quantised to 0°, 45°, 90° or 135° (OpenCV's integer test with tan 22.5° in 15-bit fixed
point, and its tie rule: strictly greater than one neighbour, at least the other); hysteresis:
candidates above ``low`` that are 8-connected to one above ``high``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def to_gray(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> grey uint8 (H, W), as ``cv2.cvtColor(..., COLOR_RGB2GRAY)``."""
    rgb = np.asarray(image).astype(np.int64)
    # BT.601 weights in 15-bit fixed point (9798 + 19235 + 3735 = 2^15), rounded
    return ((rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + 16384) >> 15
            ).astype(np.uint8)


def _as_uint8(image: Any) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"images must be uint8 or floats in [0, 1], got {a.dtype}")
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 3:
        return to_gray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        return a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"an image must be (H, W), (H, W, 1) or (H, W, 3), got {a.shape}")
    return a


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(gray.astype(np.int32), 1, mode="edge")  # OpenCV's BORDER_REPLICATE
    left, mid, right = p[:, :-2], p[:, 1:-1], p[:, 2:]
    dx_rows = right - left
    dx = dx_rows[:-2] + 2 * dx_rows[1:-1] + dx_rows[2:]
    smooth = left + 2 * mid + right
    dy = smooth[2:] - smooth[:-2]
    return dx, dy


def canny(image: Any, low: float = 100.0, high: float = 200.0, l2: bool = False
          ) -> np.ndarray:
    """Canny edges of an image (uint8 or [0, 1] floats; RGB is turned grey first): uint8 (H, W),
    255 on edges, as ``cv2.Canny(grey, low, high, L2gradient=l2)`` with aperture 3."""
    if not 0 <= low <= high:
        raise ValueError(f"thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    gray = _as_uint8(image)
    dx, dy = _sobel(gray)
    if l2:
        mag = dx.astype(np.int64) ** 2 + dy.astype(np.int64) ** 2
        low, high = min(low, 32767.0) ** 2, min(high, 32767.0) ** 2
    else:
        mag = (np.abs(dx) + np.abs(dy)).astype(np.int64)
    lo, hi = int(np.floor(low)), int(np.floor(high))
    h, w = gray.shape
    m = np.pad(mag, 1)  # zero magnitude outside the image
    c = m[1:-1, 1:-1]

    def at(di: int, dj: int) -> np.ndarray:
        return m[1 + di: 1 + di + h, 1 + dj: 1 + dj + w]

    xs, ys = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64)
    tg22x = xs * _TG22
    ys_s = ys << _SHIFT
    tg67x = tg22x + (xs << (_SHIFT + 1))
    horizontal = ys_s < tg22x
    vertical = ~horizontal & (ys_s > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # OpenCV: s = 1 when the signs agree, else -1
    keep = np.zeros((h, w), bool)
    keep |= horizontal & (c > at(0, -1)) & (c >= at(0, 1))
    keep |= vertical & (c > at(-1, 0)) & (c >= at(1, 0))
    keep |= diagonal & same_sign & (c > at(-1, -1)) & (c > at(1, 1))
    keep |= diagonal & ~same_sign & (c > at(-1, 1)) & (c > at(1, -1))
    candidate = keep & (c > lo)
    strong = candidate & (c > hi)
    return (_hysteresis(candidate, strong) * 255).astype(np.uint8)


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros_like(candidate)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    return keep[labels]


def canny_condition(image: Any, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """A control condition from an image: its Canny edges as an RGB image in [0, 1]
    (H, W, 3), what ``control_image=`` takes."""
    edges = canny(image, low, high).astype(np.float32) / 255.0
    return np.repeat(edges[..., None], 3, axis=-1)

"""Images out of a pipeline: PixArt's resize-and-crop back from the binned size, NumPy or PIL."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np

from jdit.pipelines.arguments import non_finite_images


def resize_and_crop(images: jax.Array, height: int, width: int) -> jax.Array:
    """Scale (B, H, W, C) images to cover ``height`` x ``width`` keeping their aspect ratio
    (bilinear, half-pixel centres, no antialiasing: torch's ``interpolate(mode="bilinear",
    align_corners=False)``), then crop the centre, as diffusers' PixArt image processor does."""
    _, h, w, c = images.shape
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    rh, rw = int(h * ratio), int(w * ratio)
    resized = jax.image.resize(images, (images.shape[0], rh, rw, c), "bilinear", antialias=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return resized[:, top: top + height, left: left + width]


def to_output(images: np.ndarray, output_type: str) -> np.ndarray | list[Any]:
    """``np``: the float32 array in [0, 1]; ``pil``: a list of ``PIL.Image`` (rounded to uint8).
    Images holding NaN or infinity are never passed off as pictures: ``np`` returns them with a
    ``RuntimeWarning`` naming them, ``pil`` raises ``FloatingPointError``."""
    bad = non_finite_images(images)
    if bad:
        message = (f"{len(bad)} of {len(images)} generated images hold NaN or infinite values "
                   f"(indices {bad}): the model or its weights produced them")
        if output_type != "np":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    if output_type == "np":
        return images.astype(np.float32)
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError('output_type="pil" needs Pillow: pip install "jdit[pipelines]"') from e
    as_uint8 = (np.asarray(images) * 255).round().astype(np.uint8)
    return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in as_uint8]


__all__ = ["resize_and_crop", "to_output"]

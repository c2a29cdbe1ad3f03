"""What a generation call must be given, checked before anything is compiled or drawn.

Shared by the pipelines and ``jdit sample``: a wrong argument is named with what was expected,
instead of surfacing as a NaN image, a shape error deep in the transformer or an MLIR message.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

_SEED_RANGE = (-(2 ** 63), 2 ** 64)


def check_generation(*, num_steps: Any, guidance_scale: Any, seed: Any,
                     num_images_per_prompt: Any = 1) -> None:
    """Refuse a non-integer or non-positive ``num_steps`` / ``num_images_per_prompt``, a
    non-finite or non-real ``guidance_scale`` and a seed outside 64 bits."""
    for name, value in (("num_steps", num_steps), ("num_images_per_prompt", num_images_per_prompt)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if not _is_int(seed) or not _SEED_RANGE[0] <= seed < _SEED_RANGE[1]:
        raise ValueError(f"seed must be an integer that fits in 64 bits, got {seed!r}")


def check_size(height: Any, width: Any, multiple: int) -> None:
    """Refuse image sizes that are not positive multiples of ``multiple`` (the VAE factor times
    the patch size: what one latent token covers)."""
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value % multiple:
            raise ValueError(f"{name}={value} is not a multiple of {multiple} (VAE factor × patch "
                             "size); try " f"{max(multiple, round(value / multiple) * multiple)}")


def check_latents(latents: Any, shape: tuple[int, ...], name: str = "latents") -> np.ndarray:
    """``latents`` (or another array of noise called ``name``) as a float32 array of
    ``shape`` (NHWC), refusing other dtypes, shapes and non-finite values."""
    array = np.asarray(latents)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise ValueError(f"{name} must be floating point (standard-normal noise), got dtype "
                         f"{array.dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"{name} of shape {array.shape}; expected {tuple(shape)} (NHWC)")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} hold {int((~np.isfinite(array)).sum())} NaN or infinite values")
    return array


def non_finite_images(images: np.ndarray) -> list[int]:
    """Indices of the images in a batch that hold a NaN or an infinity."""
    images = np.asarray(images)
    return [int(i) for i in np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(1))]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)

"""Control conditions for :class:`jdit.pipelines.TextToImage`: the images a user passes, made
into the latents a ControlNet or an EasyControl condition branch reads (:mod:`jdit.control`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _as_array(image: Any) -> np.ndarray:
    """A PIL image, or an array (H, W, C) / (B, H, W, C): uint8 [0, 255] or float [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"a control image must be (H, W, 3) or (B, H, W, 3) (or one channel), "
                         f"got shape {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ValueError("a float control image must hold finite values in [0, 1]")
    else:
        raise ValueError(f"a control image must be uint8 or float, got dtype {a.dtype}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


def control_images(images: Any, batch: int, height: int, width: int) -> list[np.ndarray]:
    """One or several conditions (a list of images) as float32 [0, 1] (batch, height, width, 3)
    arrays: a single image serves the whole batch; other sizes are resized (bilinear)."""
    many = isinstance(images, list | tuple) and len(images) > 0 and not np.isscalar(images[0]) \
        and (hasattr(images[0], "convert") or np.asarray(images[0]).ndim >= 3)
    out = []
    for image in (images if many else [images]):
        a = _as_array(image)
        if a.shape[0] not in (1, batch):
            raise ValueError(f"a control image batch of {a.shape[0]} for {batch} images")
        a = np.broadcast_to(a, (batch, *a.shape[1:]))
        if a.shape[1:3] != (height, width):
            a = np.asarray(jax.image.resize(jnp.asarray(a), (batch, height, width, 3),
                                            "bilinear", antialias=True))
        out.append(np.ascontiguousarray(a, np.float32))
    return out


def scales_for(scale: float | Sequence[float], n: int) -> list[float]:
    scales = [scale] * n if isinstance(scale, int | float | np.number) else list(scale)
    if len(scales) != n:
        raise ValueError(f"{len(scales)} control scales for {n} conditions")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int | float | np.number) or \
                not np.isfinite(s):
            raise ValueError(f"a control scale must be a finite number, got {s!r}")
    return [float(s) for s in scales]


def encode_images(vae: Any, vae_params: Any, images: Array) -> Array:
    """[0, 1] images -> latents as the transformer sees them (VAE encoding, shifted and scaled
    as diffusers' pipelines do; a KL VAE's posterior mean)."""
    scale = float(vae.scaling_factor)
    shift = float(getattr(vae, "shift_factor", None) or 0.0)
    z = vae.apply({"params": vae_params}, images * 2.0 - 1.0, method="encode")
    return (z - shift) * scale

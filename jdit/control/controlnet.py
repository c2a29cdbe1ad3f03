"""ControlNet-Transformers (SANA's, diffusers ``SanaControlNetModel``; PixArt-δ's): a trainable
copy of the base's first blocks reads the condition and returns one residual per copied block,
which the base adds to its own blocks' outputs (``block_residuals=``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def block_residuals(residuals: Array, depth: int, offset: int) -> Array:
    """A ControlNet's residuals (N, B, L, D) placed on the base's ``depth`` blocks: residual
    ``i`` on block ``i + offset`` (SANA: 1, diffusers adds it after base block i + 1; PixArt-δ:
    0, before base block i + 1), zeros elsewhere."""
    n = residuals.shape[0]
    if offset < 0 or n + offset > depth:
        raise ValueError(f"{n} ControlNet residuals from block {offset} do not fit a base of "
                         f"{depth} blocks")
    return jnp.pad(residuals, ((offset, depth - n - offset),) + ((0, 0),) * (residuals.ndim - 1))

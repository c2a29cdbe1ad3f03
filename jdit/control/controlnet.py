"""ControlNet-Transformers (SANA's, diffusers ``SanaControlNetModel``; PixArt-δ's): a trainable
copy of the base's first blocks reads the condition and returns one residual per copied block,
which the base adds to its own blocks' outputs (``block_residuals=``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

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


def residuals(controlnet: nn.Module, params: Any, base: nn.Module, base_params: Any, x: Array,
              t: Array, context: Array, context_mask: Array | None, condition: Array,
              scale: float | Array = 1.0, **micro: Array) -> Array:
    """A ControlNet's residuals for every block of ``base`` (``block_residuals=`` of its apply):
    SANA's reads the noisy latents and the condition latents itself; PixArt-δ's reads the
    base's block-0 output, caption features and modulation (``needs_base``). ``micro``: the
    base's micro-conditions (PixArt-α 1024's ``resolution``, ``aspect_ratio``)."""
    if getattr(controlnet, "needs_base", False):
        inputs = base.apply({"params": base_params}, x, t, context, context_mask, condition,
                            method="controlnet_inputs", **micro)
        res = controlnet.apply({"params": params}, **inputs, scale=scale)
    else:
        res = controlnet.apply({"params": params}, x, t, context, context_mask, condition, scale)
    return block_residuals(res, base.depth, controlnet.residual_offset)

"""Classifier-free guidance with the conditional and unconditional passes in one batched forward."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Wraps ``model_fn(x2, t2, *args)`` over a doubled batch into ``fn(x, t, scale, *args)``.

    The doubled batch is ``[unconditional; conditional]`` (diffusers' order): ``model_fn`` must
    arrange its conditioning (null caption or class, then the real one) the same way. The result
    is ``uncond + scale · (cond - uncond)`` on the first ``guided_channels`` channels (default:
    those of ``x``, so a learned-sigma model's variance channels come from the conditional pass).
    ``scale`` is a scalar or one value per sample. With ``interval=(lo, hi)`` guidance applies
    only where ``lo <= t <= hi`` (model timestep units); elsewhere the conditional prediction is
    used. Frozen and hashable: rebuilding it with the same function does not recompile.
    """

    model_fn: Callable[..., Array]
    interval: tuple[float, float] | None = None
    guided_channels: int | None = None

    def __call__(self, x: Array, t: Array, scale: Array | float, *args: Any) -> Array:
        b = x.shape[0]
        out = self.model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), *args)
        uncond, cond = out[:b], out[b:]
        g = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (b,))
        if self.interval is not None:
            lo, hi = self.interval
            g = jnp.where((t >= lo) & (t <= hi), g, 1.0)
        g = g.reshape((b,) + (1,) * (x.ndim - 1))
        c = x.shape[-1] if self.guided_channels is None else self.guided_channels
        guided = uncond[..., :c] + g * (cond[..., :c] - uncond[..., :c])
        return jnp.concatenate([guided, cond[..., c:]], axis=-1)

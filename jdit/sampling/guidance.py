"""Classifier-free guidance with the conditional and unconditional passes in one batched forward."""

from __future__ import annotations

import dataclasses
import functools
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
    used. ``rescale_axis``: the guided prediction is rescaled to the conditional one's L2 norm
    along that axis (Lumina-Image 2.0's ``cfg_normalization``). Frozen and hashable: rebuilding
    it with the same function does not recompile.
    """

    model_fn: Callable[..., Array]
    interval: tuple[float, float] | None = None
    guided_channels: int | None = None
    rescale_axis: int | None = None

    def __call__(self, x: Array, t: Array, scale: Array | float, *args: Any) -> Array:
        out = self.model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), *args)
        return self.combine(out, x, t, scale)

    def combine(self, out: Array, x: Array, t: Array, scale: Array | float) -> Array:
        """The guided prediction from the doubled batch's ``[uncond; cond]`` outputs."""
        b = x.shape[0]
        uncond, cond = out[:b], out[b:]
        g = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (b,))
        if self.interval is not None:
            lo, hi = self.interval
            g = jnp.where((t >= lo) & (t <= hi), g, 1.0)
        g = g.reshape((b,) + (1,) * (x.ndim - 1))
        c = x.shape[-1] if self.guided_channels is None else self.guided_channels
        guided = uncond[..., :c] + g * (cond[..., :c] - uncond[..., :c])
        if self.rescale_axis is not None:  # Lumina-Image 2.0's cfg_normalization
            norm = functools.partial(jnp.linalg.norm, axis=self.rescale_axis, keepdims=True)
            rescaled = guided * (norm(cond[..., :c]) / norm(guided))
            guided = jnp.where(g == 1.0, guided, rescaled)  # unguided steps stay the cond's
        return jnp.concatenate([guided, cond[..., c:]], axis=-1)


@dataclasses.dataclass(frozen=True)
class PerturbedAttentionGuidance:
    """Perturbed-attention guidance (Ahn et al., 2024; diffusers' PAG pipelines), with or
    without classifier-free guidance: ``fn(x, t, scale, pag_scale, *args)``.

    ``model_fn`` runs the batch ``[uncond; cond; perturbed]`` (``cfg=True``) or ``[cond;
    perturbed]``, the perturbed rows being the conditional ones with identity self-attention in
    the chosen blocks (the caller arranges the conditioning and marks them). The result is
    ``uncond + scale (cond − uncond) + s (cond − perturbed)`` (without CFG: ``cond + s (cond −
    perturbed)``) on the first ``x.shape[-1]`` channels, where ``s = pag_scale`` or, with
    ``adaptive > 0``, ``max(pag_scale − adaptive (1000 − t), 0)`` (t in model timesteps).
    """

    model_fn: Callable[..., Array]
    cfg: bool = True
    adaptive: float = 0.0

    def __call__(self, x: Array, t: Array, scale: Array | float, pag_scale: Array | float,
                 *args: Any) -> Array:
        n = 3 if self.cfg else 2
        b, c = x.shape[0], x.shape[-1]
        out = self.model_fn(jnp.concatenate([x] * n), jnp.concatenate([t] * n), *args)
        parts = [out[i * b:(i + 1) * b] for i in range(n)]
        cond, perturbed = parts[-2], parts[-1]
        shape = (b,) + (1,) * (x.ndim - 1)
        s = jnp.broadcast_to(jnp.asarray(pag_scale, jnp.float32), (b,))
        if self.adaptive > 0:
            s = jnp.maximum(s - self.adaptive * (1000.0 - t), 0.0)
        s = s.reshape(shape)
        pag = s * (cond[..., :c] - perturbed[..., :c])
        if self.cfg:  # diffusers' order of the sums
            g = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (b,)).reshape(shape)
            uncond = parts[0][..., :c]
            guided = uncond + g * (cond[..., :c] - uncond) + pag
        else:
            guided = cond[..., :c] + pag
        return jnp.concatenate([guided, cond[..., c:]], axis=-1)

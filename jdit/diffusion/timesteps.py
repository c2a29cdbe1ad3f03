"""Training timestep samplers: uniform DDPM steps, and the SD3 densities over flow σ."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

FLOW_SAMPLERS = ("uniform", "logit_normal", "mode", "cosmap")


def sample_ddpm_timesteps(key: Array, batch: int, num_train_timesteps: int = 1000) -> Array:
    """Integer timesteps uniform on ``0 .. T-1`` (DDPM, PixArt)."""
    return jax.random.randint(key, (batch,), 0, num_train_timesteps)


def sample_flow_sigmas(key: Array, batch: int, kind: str = "logit_normal", *, mean: float = 0.0,
                       std: float = 1.0, mode_scale: float = 1.29) -> Array:
    """σ in (0, 1) for rectified-flow training (Esser et al., 2024, §3.1).

    - ``uniform``: U(0, 1).
    - ``logit_normal``: sigmoid(N(mean, std)); density ``φ((logit σ - m)/s) / (s σ (1 - σ))``.
    - ``mode``: ``1 - u - s (cos²(πu/2) - 1 + u)`` with u ~ U(0, 1) and s = ``mode_scale``
      (heavier weight on the middle for s > 0; monotone for -1 <= s <= 2/(π - 2)).
    - ``cosmap``: ``1 - 1 / (tan(πu/2) + 1)``; density ``2 / (π (1 - 2σ + 2σ²))``.
    """
    if kind not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow timestep sampler {kind!r}; choose from {FLOW_SAMPLERS}")
    if kind == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))
    u = jax.random.uniform(key, (batch,))
    if kind == "uniform":
        return u
    if kind == "mode":
        if not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"mode_scale must lie in [-1, 2/(π-2)] to keep the map monotone, "
                             f"got {mode_scale}")
        return 1.0 - u - mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    return 1.0 - 1.0 / (jnp.tan(math.pi * u / 2) + 1.0)

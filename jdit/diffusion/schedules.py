"""Noise schedules: discrete variance-preserving DDPM and rectified flow.

Both are frozen, hashable dataclasses, so they can be static arguments of ``jax.jit``.

VP (DDPM): ``x_t = α_t x_0 + σ_t ε`` with ``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 - ᾱ_t)``,
``ᾱ_t = Π (1 - β_s)``, integer training timesteps ``t = 0 .. T-1``.
Flow: ``x_σ = (1 - σ) x_0 + σ ε`` with the model trained on ``t = 1000 σ`` and velocity target
``ε - x_0``; ``shift`` maps ``σ -> s σ / (1 + (s - 1) σ)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdit.config import section

Array = jax.Array


def _f32(values: np.ndarray) -> tuple[float, ...]:
    # Betas are stored at float32 precision, as the PyTorch schedulers hold them.
    return tuple(float(v) for v in np.asarray(values, np.float64).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """Discrete VP schedule given by its training betas (float32 values, as diffusers)."""

    betas: tuple[float, ...]

    def __post_init__(self) -> None:
        b = np.asarray(self.betas)
        if b.ndim != 1 or len(b) < 2 or not np.all((b > 0) & (b < 1)):
            raise ValueError("DDPMSchedule betas must be a sequence of >= 2 values in (0, 1)")

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> DDPMSchedule:
        return cls(_f32(np.linspace(beta_start, beta_end, num_train_timesteps)))

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> DDPMSchedule:
        """Linear in sqrt(β) (Stable Diffusion's schedule)."""
        lin = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps).astype(np.float32)
        return cls(_f32(lin.astype(np.float32) ** 2))

    @classmethod
    def squaredcos_cap_v2(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999
                          ) -> DDPMSchedule:
        """Nichol & Dhariwal's cosine schedule, ``ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)``."""
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
        return cls(_f32(np.array(betas)))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t for t = 0 .. T-1, float64."""
        return np.cumprod(1.0 - np.asarray(self.betas, np.float64))

    @functools.cached_property
    def alphas(self) -> np.ndarray:
        """α_t = sqrt(ᾱ_t), the signal scale."""
        return np.sqrt(self.alphas_cumprod)

    @functools.cached_property
    def sigmas(self) -> np.ndarray:
        """σ_t = sqrt(1 - ᾱ_t), the noise scale."""
        return np.sqrt(1.0 - self.alphas_cumprod)

    @functools.cached_property
    def karras_sigmas(self) -> np.ndarray:
        """sqrt((1 - ᾱ_t) / ᾱ_t): the variance-exploding σ of Karras-style samplers."""
        return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    @functools.cached_property
    def log_snr(self) -> np.ndarray:
        """λ_t = log(ᾱ_t / (1 - ᾱ_t)) = 2 log(α_t / σ_t)."""
        return np.log(self.alphas_cumprod) - np.log1p(-self.alphas_cumprod)

    def _at(self, table: np.ndarray, t: Array) -> Array:
        return jnp.take(jnp.asarray(table, jnp.float32), jnp.asarray(t).astype(jnp.int32))

    def alpha(self, t: Array) -> Array:
        return self._at(self.alphas, t)

    def sigma(self, t: Array) -> Array:
        return self._at(self.sigmas, t)

    def snr(self, t: Array) -> Array:
        return jnp.exp(self._at(self.log_snr, t))

    def add_noise(self, x0: Array, noise: Array, t: Array) -> Array:
        """``α_t x0 + σ_t ε`` for integer timesteps ``t`` of shape (B,)."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) * noise

    def velocity(self, x0: Array, noise: Array, t: Array) -> Array:
        """The v-prediction target ``α_t ε - σ_t x0``."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return self.alpha(t).reshape(shape) * noise - self.sigma(t).reshape(shape) * x0


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow with a timestep shift.

    ``dynamic=True`` marks a shift that came from the image token count (Flux); diffusers then
    leaves the smallest training σ unshifted, which changes the sampling grid slightly.
    ``grid``: the sampling grid, ``"scheduler"`` (the scheduler's own ``set_timesteps``) or
    ``"linspace"`` (σ = linspace(1, 1/N, N) shifted: what pipelines that pass their own sigmas
    use, e.g. Lumina-Image 2.0's).
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    dynamic: bool = False
    grid: str = "scheduler"

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"FlowSchedule shift must be > 0, got {self.shift}")
        if self.grid not in ("scheduler", "linspace"):
            raise ValueError(f"FlowSchedule grid must be 'scheduler' or 'linspace', got "
                             f"{self.grid!r}")

    @classmethod
    def for_resolution(cls, num_pixels: float, base_pixels: float, base_shift: float = 1.0,
                       num_train_timesteps: int = 1000) -> FlowSchedule:
        """SD3's resolution-dependent shift ``α = base_shift · sqrt(m / n)`` for m target and n
        reference pixels (or tokens)."""
        return cls(base_shift * math.sqrt(num_pixels / base_pixels), num_train_timesteps)

    @classmethod
    def dynamic_from_tokens(cls, num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
                            base_shift: float = 0.5, max_shift: float = 1.15,
                            num_train_timesteps: int = 1000) -> FlowSchedule:
        """Flux's dynamic shift: ``μ`` linear in the token count, shift ``e^μ``."""
        slope = (max_shift - base_shift) / (max_tokens - base_tokens)
        mu = base_shift + slope * (num_tokens - base_tokens)
        return cls(math.exp(mu), num_train_timesteps, dynamic=True)

    def shift_sigma(self, sigma: np.ndarray | Array) -> np.ndarray | Array:
        s = self.shift
        return s * sigma / (1 + (s - 1) * sigma)

    def log_snr(self, sigma: Array) -> Array:
        """λ = 2 log((1 - σ) / σ)."""
        return 2.0 * (jnp.log1p(-sigma) - jnp.log(sigma))

    def add_noise(self, x0: Array, noise: Array, sigma: Array) -> Array:
        """``(1 - σ) x0 + σ ε`` for σ of shape (B,)."""
        s = jnp.asarray(sigma, jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
        return (1.0 - s) * x0 + s * noise

    @staticmethod
    def velocity(x0: Array, noise: Array) -> Array:
        """The flow-matching target ``ε - x0``."""
        return noise - x0


Schedule = DDPMSchedule | FlowSchedule


def make_schedule(cfg: Mapping[str, Any]) -> Schedule:
    """The schedule a config's ``diffusion`` section names (``objective``, ``schedule``,
    ``flow_shift``; defaults in :data:`jdit.config.SECTIONS`)."""
    cfg = section("diffusion", cfg)
    if cfg["objective"] == "flow":
        return FlowSchedule(float(cfg["flow_shift"]))
    if cfg["objective"] != "ddpm":
        raise ValueError(f"diffusion.objective must be 'ddpm' or 'flow', got {cfg['objective']!r}")
    makers = {"linear": DDPMSchedule.linear, "scaled_linear": DDPMSchedule.scaled_linear,
              "squaredcos_cap_v2": DDPMSchedule.squaredcos_cap_v2}
    if cfg["schedule"] not in makers:
        raise ValueError(f"diffusion.schedule must be one of {sorted(makers)}, got "
                         f"{cfg['schedule']!r}")
    return makers[cfg["schedule"]]()

"""ARLON's noise tolerance: perturbations of the coarse plan so that the DiT learns not to trust
it blindly ("uncertainty sampling"; its exact form is not published).

Two pure, jittable functions:

- :func:`corrupt_tokens` (token level): a fraction of the VQ/AR token indices replaced by
  uniformly drawn *other* codes. The evaluation's "20 % of the AR tokens replaced at random" is
  ``corrupt_tokens(rng, tokens, K, 0.2)``: exactly ``round(0.2 · n)`` tokens of each example
  change (``exact=True``), each to a code different from its own.
- :func:`perturb_features` (feature level): ``x + σ_b · ε``, ε ~ N(0, I), with one
  ``σ_b ~ U[0, max_std]`` per example, so a batch mixes clean and noisy plans.

Default in training (:class:`UncertaintySampling`): **feature level only**, on the coarse
latent decoded from the ground-truth tokens, before the projection and adapter, with
``max_std = 0.5`` (the toy's latents are about unit scale); token corruption off
(``token_fraction = 0``). Why: ARLON describes uncertainty sampling as a perturbation of the
features, not of the tokens, and the token-level corruption is the evaluation's stress test, so
training on it would tailor the model to the test. Perturbing the coarse latent rather than the
adapter's output keeps the noise on a fixed scale: on the adapter output the adapter could
grow its features to drown the noise out. ``token_fraction > 0`` adds token corruption with a
per-example fraction drawn from ``U[0, token_fraction]`` (before decoding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


def _per_example(value: float | Array, batch: int) -> Array:
    v = jnp.asarray(value, jnp.float32)
    if v.ndim == 0:
        return jnp.full((batch,), v)
    if v.shape != (batch,):
        raise ValueError(f"a per-example value must be a scalar or ({batch},), got {v.shape}")
    return v


def corrupt_tokens(rng: Array, tokens: Array, codebook_size: int, fraction: float | Array,
                   *, exact: bool = True) -> Array:
    """Replace a ``fraction`` (scalar or per example (B,)) of each example's tokens (B, ...) by
    uniformly drawn different codes in ``[0, codebook_size)``.

    ``exact=True``: exactly ``round(fraction · n)`` positions per example (n tokens per example),
    chosen uniformly; ``exact=False``: each token independently with probability ``fraction``.
    """
    if codebook_size < 2:
        raise ValueError(f"corrupt_tokens needs a codebook of at least 2 codes, got "
                         f"{codebook_size}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim < 2:
        raise ValueError(f"corrupt_tokens expects integer tokens (B, ...), got {tokens.dtype} "
                         f"{tokens.shape}")
    b = tokens.shape[0]
    flat = tokens.reshape(b, -1)
    n = flat.shape[1]
    frac = _per_example(fraction, b)
    if not isinstance(frac, jax.core.Tracer) and not bool(jnp.all((frac >= 0) & (frac <= 1))):
        raise ValueError(f"corrupt_tokens: fraction must be in [0, 1], got {fraction}")
    pick, shift = jax.random.split(rng)
    u = jax.random.uniform(pick, flat.shape)
    if exact:
        rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)  # a uniform random permutation
        replace = rank < jnp.round(frac * n)[:, None]
    else:
        replace = u < frac[:, None]
    # original + s (mod K), s uniform in [1, K): a uniform draw among the *other* codes
    offset = jax.random.randint(shift, flat.shape, 1, codebook_size, flat.dtype)
    new = (flat + offset) % codebook_size
    return jnp.where(replace, new, flat).reshape(tokens.shape)


def perturb_features(rng: Array, x: Array, max_std: float | Array) -> Array:
    """``x + σ_b ε`` with ``σ_b ~ U[0, max_std]`` drawn per example (axis 0), ε ~ N(0, I);
    returned in ``x``'s dtype."""
    b = x.shape[0]
    scale_key, noise_key = jax.random.split(rng)
    sigma = jax.random.uniform(scale_key, (b,)) * jnp.asarray(max_std, jnp.float32)
    eps = jax.random.normal(noise_key, x.shape, jnp.float32)
    sigma = sigma.reshape((b,) + (1,) * (x.ndim - 1))
    return (x.astype(jnp.float32) + sigma * eps).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class UncertaintySampling:
    """What a training step applies to the coarse plan (see the module docstring for the
    defaults): ``tokens(rng, tokens, K)`` before VQ decoding, ``features(rng, coarse)`` after."""

    feature_max_std: float = 0.5
    token_fraction: float = 0.0  # the largest per-example fraction of tokens replaced

    def __post_init__(self) -> None:
        if self.feature_max_std < 0:
            raise ValueError(f"feature_max_std must be >= 0, got {self.feature_max_std}")
        if not 0.0 <= self.token_fraction <= 1.0:
            raise ValueError(f"token_fraction must be in [0, 1], got {self.token_fraction}")

    def tokens(self, rng: Array, tokens: Array, codebook_size: int) -> Array:
        if self.token_fraction == 0.0:
            return tokens
        pick, corrupt = jax.random.split(rng)
        frac = jax.random.uniform(pick, (tokens.shape[0],)) * self.token_fraction
        return corrupt_tokens(corrupt, tokens, codebook_size, frac)

    def features(self, rng: Array, coarse: Array) -> Array:
        if self.feature_max_std == 0.0:
            return coarse
        return perturb_features(rng, coarse, self.feature_max_std)

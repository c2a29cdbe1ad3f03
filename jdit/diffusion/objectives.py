"""Training objectives. Every loss returns one value per example, shape (B,); reduce as you like.

- :func:`diffusion_loss`: ε / v / x0-prediction MSE on a DDPM schedule, optional min-SNR-γ.
- :func:`learned_sigma_loss`: PixArt's (and IDDPM's) hybrid loss for 2C-channel models: MSE on
  ε plus the variational bound for the interpolated variance, with the mean detached.
- :func:`flow_loss`: rectified-flow velocity MSE, optional σ⁻² or CosMap weighting.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jdit.diffusion.schedules import DDPMSchedule

Array = jax.Array

PREDICTIONS = ("epsilon", "v", "sample")
DDPM_WEIGHTINGS = (None, "min_snr")
FLOW_WEIGHTINGS = (None, "sigma_sqrt", "cosmap")


def _per_example_mean(x: Array) -> Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _bcast(v: Array, like: Array) -> Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def prediction_target(schedule: DDPMSchedule, prediction: str, x0: Array, noise: Array,
                      t: Array) -> Array:
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return schedule.velocity(x0, noise, t)
    if prediction == "sample":
        return x0
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def loss_weight(schedule: DDPMSchedule, t: Array, prediction: str, weighting: str | None,
                snr_gamma: float = 5.0) -> Array:
    """Per-example weights. ``min_snr`` (Hang et al., 2023) caps the SNR at γ:
    ``min(SNR, γ)/SNR`` for ε, ``min(SNR, γ)/(SNR + 1)`` for v, ``min(SNR, γ)`` for x0."""
    if weighting not in DDPM_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {DDPM_WEIGHTINGS}, got {weighting!r}")
    if weighting is None:
        return jnp.ones(t.shape, jnp.float32)
    snr = schedule.snr(t)
    capped = jnp.minimum(snr, snr_gamma)
    return {"epsilon": capped / snr, "v": capped / (snr + 1.0), "sample": capped}[prediction]


def diffusion_loss(pred: Array, x0: Array, noise: Array, t: Array, schedule: DDPMSchedule, *,
                   prediction: str = "epsilon", weighting: str | None = None,
                   snr_gamma: float = 5.0) -> Array:
    """Weighted MSE between the model's prediction and its target at ``x_t = α_t x0 + σ_t ε``."""
    target = prediction_target(schedule, prediction, x0, noise, t)
    mse = _per_example_mean(jnp.square(pred.astype(jnp.float32) - target))
    return loss_weight(schedule, t, prediction, weighting, snr_gamma) * mse


def _posterior(schedule: DDPMSchedule) -> dict[str, np.ndarray]:
    """q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, β̃_t), with log β̃ clipped at t = 0 (IDDPM)."""
    ac = schedule.alphas_cumprod
    ac_prev = np.append(1.0, ac[:-1])
    betas = 1.0 - ac / ac_prev
    var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "c0": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "ct": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        "log_var": np.log(np.append(var[1], var[1:])),
        "log_beta": np.log(betas),
    }


def gaussian_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x: Array) -> Array:
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """log P(x) of data in [-1, 1] quantised to 256 levels under N(mean, e^{2 log_scale}).

    Uses the tanh approximation of the normal CDF, as IDDPM and PixArt do.
    """
    centred = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def learned_sigma_vb(model_out: Array, x0: Array, x_t: Array, t: Array,
                     schedule: DDPMSchedule) -> Array:
    """The variational-bound term (bits per dimension) for a learned-range variance.

    ``model_out`` has 2C channels: ε̂ (detached here: the mean is trained by the MSE term) and
    v ∈ [-1, 1], which interpolates ``log σ² = (v+1)/2 log β_t + (1 - (v+1)/2) log β̃_t``.
    For t > 0 the term is KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t)); at t = 0 it is the
    discretised Gaussian decoder NLL of x0.
    """
    c = x0.shape[-1]
    eps, v = jax.lax.stop_gradient(model_out[..., :c]), model_out[..., c:]
    post = {k: jnp.asarray(a, jnp.float32) for k, a in _posterior(schedule).items()}
    ti = t.astype(jnp.int32)

    def at(name: str) -> Array:
        return _bcast(jnp.take(post[name], ti), x0)

    alpha, sigma = _bcast(schedule.alpha(ti), x0), _bcast(schedule.sigma(ti), x0)
    x0_hat = (x_t - sigma * eps) / alpha
    model_mean = at("c0") * x0_hat + at("ct") * x_t
    frac = (v + 1.0) / 2.0
    model_log_var = frac * at("log_beta") + (1.0 - frac) * at("log_var")
    true_mean = at("c0") * x0 + at("ct") * x_t
    kl = _per_example_mean(gaussian_kl(true_mean, at("log_var"), model_mean, model_log_var))
    nll = -_per_example_mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return jnp.where(ti == 0, nll, kl) / math.log(2.0)


def learned_sigma_loss(model_out: Array, x0: Array, noise: Array, t: Array,
                       schedule: DDPMSchedule) -> Array:
    """PixArt's training loss for learned-sigma models: MSE(ε̂, ε) + VB (unscaled)."""
    c = x0.shape[-1]
    if model_out.shape[-1] != 2 * c:
        raise ValueError(f"learned_sigma_loss needs 2C={2 * c} output channels, got {model_out.shape[-1]}")
    model_out = model_out.astype(jnp.float32)
    x_t = schedule.add_noise(x0, noise, t)
    mse = _per_example_mean(jnp.square(model_out[..., :c] - noise))
    return mse + learned_sigma_vb(model_out, x0, x_t, t, schedule)


def flow_weight(sigma: Array, weighting: str | None) -> Array:
    """``sigma_sqrt``: σ⁻²; ``cosmap``: 2 / (π (1 - 2σ + 2σ²)); None: 1."""
    if weighting not in FLOW_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {FLOW_WEIGHTINGS}, got {weighting!r}")
    sigma = sigma.astype(jnp.float32)
    if weighting == "sigma_sqrt":
        return sigma**-2.0
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
    return jnp.ones_like(sigma)


def flow_loss(pred: Array, x0: Array, noise: Array, sigma: Array,
              weighting: str | None = None) -> Array:
    """Rectified-flow loss: weighted MSE between the predicted and true velocity ``ε - x0``
    at ``x_σ = (1 - σ) x0 + σ ε``."""
    mse = _per_example_mean(jnp.square(pred.astype(jnp.float32) - (noise - x0)))
    return flow_weight(sigma, weighting) * mse

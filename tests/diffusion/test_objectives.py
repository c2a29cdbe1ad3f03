"""Objectives and timestep samplers against closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from jdit.diffusion import DDPMSchedule, FlowSchedule
from jdit.diffusion.objectives import (
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    flow_loss,
    learned_sigma_loss,
    learned_sigma_vb,
    loss_weight,
)
from jdit.diffusion.timesteps import sample_flow_sigmas

SCHED = DDPMSchedule.linear()
RNG = np.random.default_rng(0)
SHAPE = (4, 3, 3, 2)


def arrays(*shapes, scale=1.0):
    return [RNG.standard_normal(s).astype(np.float32) * scale for s in shapes]


def posterior_reference(x0, x_t, t):
    """q(x_{t-1} | x_t, x0) from Bayes' rule on the forward process (float64)."""
    betas = np.asarray(SCHED.betas, np.float64)
    ac = np.cumprod(1 - betas)
    a_prev = ac[t - 1]
    var = betas[t] * (1 - a_prev) / (1 - ac[t])
    mean = (np.sqrt(a_prev) * betas[t] / (1 - ac[t])) * x0 + (
        np.sqrt(1 - betas[t]) * (1 - a_prev) / (1 - ac[t])) * x_t
    return mean, var, betas[t]


@pytest.mark.parametrize("t", [1, 17, 500, 999])
def test_vb_term_is_the_analytic_gaussian_kl(t):
    x0, x_t, eps_hat = arrays(SHAPE, SHAPE, SHAPE)
    v = np.tanh(arrays(SHAPE)[0])
    ts = np.full((SHAPE[0],), t)
    got = np.asarray(learned_sigma_vb(jnp.asarray(np.concatenate([eps_hat, v], -1)),
                                      jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(ts), SCHED))
    mean_q, var_q, beta = posterior_reference(x0.astype(np.float64), x_t.astype(np.float64), t)
    ac = np.cumprod(1 - np.asarray(SCHED.betas, np.float64))[t]
    x0_hat = (x_t - np.sqrt(1 - ac) * eps_hat) / np.sqrt(ac)
    mean_p, _, _ = posterior_reference(x0_hat, x_t.astype(np.float64), t)
    frac = (v + 1) / 2
    var_p = np.exp(frac * np.log(beta) + (1 - frac) * np.log(var_q))
    kl = kl_divergence(Normal(torch.from_numpy(mean_q), torch.from_numpy(np.sqrt(var_q) * np.ones_like(mean_q))),
                       Normal(torch.from_numpy(mean_p), torch.from_numpy(np.sqrt(var_p)))).numpy()
    want = kl.reshape(SHAPE[0], -1).mean(1) / math.log(2)
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_vb_vanishes_at_the_true_posterior_and_detaches_the_mean():
    x0, noise = arrays(SHAPE, SHAPE)
    t = jnp.array([3, 200, 640, 999])
    x_t = SCHED.add_noise(jnp.asarray(x0), jnp.asarray(noise), t)
    exact = jnp.concatenate([jnp.asarray(noise), -jnp.ones(SHAPE)], -1)  # ε̂ = ε, σ² = β̃_t
    np.testing.assert_allclose(np.asarray(learned_sigma_vb(exact, jnp.asarray(x0), x_t, t, SCHED)),
                               0.0, atol=2e-6)
    grad = jax.grad(lambda out: learned_sigma_vb(out, jnp.asarray(x0), x_t, t, SCHED).sum())(
        exact + 0.3)
    assert float(jnp.abs(grad[..., :2]).max()) == 0.0 and float(jnp.abs(grad[..., 2:]).max()) > 0


def test_decoder_nll_at_t0_matches_exact_gaussian_bins():
    x = np.clip(RNG.uniform(-1, 1, 2000), -1, 1).astype(np.float32)
    x = np.round((x + 1) * 127.5) / 127.5 - 1  # on the 256-level grid
    mean = (x + RNG.normal(0, 0.01, x.shape)).astype(np.float32)
    log_scale = np.full_like(x, math.log(0.02))
    got = np.asarray(discretized_gaussian_log_likelihood(jnp.asarray(x), jnp.asarray(mean),
                                                         jnp.asarray(log_scale)))
    dist = Normal(torch.from_numpy(mean).double(), torch.exp(torch.from_numpy(log_scale)).double())
    xt = torch.from_numpy(x).double()
    upper = torch.where(xt > 0.999, torch.ones_like(xt), dist.cdf(xt + 1 / 255))
    lower = torch.where(xt < -0.999, torch.zeros_like(xt), dist.cdf(xt - 1 / 255))
    want = torch.log(upper - lower).numpy()
    # the tanh approximation of Φ (IDDPM's) is within 2e-4 of the exact CDF
    assert np.max(np.abs(np.exp(got) - np.exp(want))) < 1e-3


def test_learned_sigma_loss_is_mse_plus_vb():
    x0, noise, out = arrays(SHAPE, SHAPE, SHAPE[:-1] + (4,))
    t = jnp.array([0, 5, 500, 999])
    loss = learned_sigma_loss(jnp.asarray(out), jnp.asarray(x0), jnp.asarray(noise), t, SCHED)
    x_t = SCHED.add_noise(jnp.asarray(x0), jnp.asarray(noise), t)
    mse = np.mean((out[..., :2] - noise).reshape(4, -1) ** 2, axis=1)
    vb = learned_sigma_vb(jnp.asarray(out), jnp.asarray(x0), x_t, t, SCHED)
    np.testing.assert_allclose(np.asarray(loss), mse + np.asarray(vb), rtol=1e-5)
    with pytest.raises(ValueError, match="needs 2C=4 output channels"):
        learned_sigma_loss(jnp.asarray(out[..., :2]), jnp.asarray(x0), jnp.asarray(noise), t, SCHED)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_prediction_targets_and_min_snr(prediction):
    x0, noise, pred = arrays(SHAPE, SHAPE, SHAPE)
    t = jnp.array([0, 250, 600, 999])
    ac = np.cumprod(1 - np.asarray(SCHED.betas, np.float64))[np.asarray(t)][:, None, None, None]
    target = {"epsilon": noise, "v": np.sqrt(ac) * noise - np.sqrt(1 - ac) * x0,
              "sample": x0}[prediction]
    mse = np.mean(((pred - target) ** 2).reshape(4, -1), axis=1)
    got = diffusion_loss(jnp.asarray(pred), jnp.asarray(x0), jnp.asarray(noise), t, SCHED,
                         prediction=prediction)
    np.testing.assert_allclose(np.asarray(got), mse, rtol=1e-5)
    snr = ac.ravel() / (1 - ac.ravel())
    capped = np.minimum(snr, 5.0)
    want = {"epsilon": capped / snr, "v": capped / (snr + 1), "sample": capped}[prediction]
    np.testing.assert_allclose(np.asarray(loss_weight(SCHED, t, prediction, "min_snr")), want,
                               rtol=1e-4)
    weighted = diffusion_loss(jnp.asarray(pred), jnp.asarray(x0), jnp.asarray(noise), t, SCHED,
                              prediction=prediction, weighting="min_snr")
    np.testing.assert_allclose(np.asarray(weighted), want * mse, rtol=1e-4)


@pytest.mark.parametrize("weighting", [None, "sigma_sqrt", "cosmap"])
def test_flow_loss(weighting):
    x0, noise, pred = arrays(SHAPE, SHAPE, SHAPE)
    sigma = np.array([0.1, 0.4, 0.7, 0.95], np.float32)
    got = flow_loss(jnp.asarray(pred), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sigma),
                    weighting)
    mse = np.mean(((pred - (noise - x0)) ** 2).reshape(4, -1), axis=1)
    w = {None: 1.0, "sigma_sqrt": sigma**-2.0,
         "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))}[weighting]
    np.testing.assert_allclose(np.asarray(got), w * mse, rtol=1e-5)
    x_sigma = FlowSchedule().add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sigma))
    np.testing.assert_allclose(np.asarray(x_sigma), (1 - sigma[:, None, None, None]) * x0
                               + sigma[:, None, None, None] * noise, rtol=1e-6)


def _moments_of_density(density, n=400_001):
    s = np.linspace(1e-9, 1 - 1e-9, n)
    p = density(s)
    z = np.trapezoid(p, s)
    mean = np.trapezoid(s * p, s) / z
    return z, mean, np.trapezoid((s - mean) ** 2 * p, s) / z


def _moments_of_map(fn, n=400_001):
    u = (np.arange(n) + 0.5) / n  # midpoint rule over u ~ U(0, 1)
    s = fn(u)
    return 1.0, s.mean(), s.var()


def _logit_normal_density(m, sd):
    return lambda s: np.exp(-((np.log(s / (1 - s)) - m) ** 2) / (2 * sd**2)) / (
        sd * np.sqrt(2 * np.pi) * s * (1 - s))


@pytest.mark.parametrize("kind,kwargs,theory", [
    ("uniform", {}, lambda: (1.0, 0.5, 1 / 12)),
    ("logit_normal", {}, lambda: _moments_of_density(_logit_normal_density(0.0, 1.0))),
    ("logit_normal", dict(mean=0.8, std=0.5),
     lambda: _moments_of_density(_logit_normal_density(0.8, 0.5))),
    ("mode", dict(mode_scale=1.29), lambda: _moments_of_map(
        lambda u: 1 - u - 1.29 * (np.cos(np.pi * u / 2) ** 2 - 1 + u))),
    ("cosmap", {}, lambda: _moments_of_density(lambda s: 2 / (np.pi * (1 - 2 * s + 2 * s**2)))),
])
def test_flow_timestep_sampler_moments(kind, kwargs, theory):
    n = 400_000
    samples = np.asarray(sample_flow_sigmas(jax.random.key(1), n, kind, **kwargs), np.float64)
    assert samples.min() > 0 and samples.max() < 1
    z, mean, var = theory()
    assert abs(z - 1) < 1e-3  # the density integrates to one
    se_mean, se_var = np.sqrt(var / n), var * np.sqrt(2 / n)
    assert abs(samples.mean() - mean) < 5 * se_mean, (samples.mean(), mean)
    assert abs(samples.var() - var) < 5 * se_var + 1e-4, (samples.var(), var)


def test_mode_sampler_mean_is_one_half_for_any_scale_and_rejects_non_monotone_scale():
    for s in (-1.0, 0.5, 1.29):
        samples = np.asarray(sample_flow_sigmas(jax.random.key(2), 200_000, "mode", mode_scale=s))
        assert abs(samples.mean() - 0.5) < 3e-3
    with pytest.raises(ValueError, match="mode_scale"):
        sample_flow_sigmas(jax.random.key(2), 4, "mode", mode_scale=2.0)
    with pytest.raises(ValueError, match="unknown flow timestep sampler"):
        sample_flow_sigmas(jax.random.key(2), 4, "beta")

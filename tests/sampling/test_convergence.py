"""ODE solvers converge to the exact probability-flow solution at their theoretical order.

On Gaussian data x0 ~ N(μ, s²) the optimal model is known in closed form and the
probability-flow ODE keeps each coordinate's z-score ``(x_t - α_t μ) / sqrt(α_t² s² + σ_t²)``
fixed, so the exact end point of a trajectory started at any (α, σ) is ``μ + s · z``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jdit
from jdit.diffusion import DDPMSchedule, FlowSchedule
from jdit.sampling import tables

D = 64
MU = np.linspace(-1.5, 1.5, D).astype(np.float32)
S = np.linspace(0.3, 1.2, D).astype(np.float32)
NOISE = np.random.default_rng(0).standard_normal((4, 1, 1, D)).astype(np.float32)
VP = DDPMSchedule.linear()


def vp_eps(x, alpha, sigma):
    """E[ε | x_t] for x_t = α x0 + σ ε."""
    return sigma * (x - alpha * MU) / (alpha**2 * S**2 + sigma**2)


def ve_sigma_of(t):
    """The VE σ the Karras-style solvers assign to a (fractional) timestep t."""
    k = VP.karras_sigmas
    return jnp.interp(t, jnp.arange(len(k), dtype=jnp.float32), jnp.asarray(k, jnp.float32))


def vp_model(x, t):
    sig = ve_sigma_of(t)[:, None, None, None]
    alpha = 1.0 / jnp.sqrt(sig**2 + 1.0)
    return vp_eps(x, alpha, sig * alpha)


def flow_model_for(sigma_of):
    def model(x, t):
        sig = sigma_of(t)[:, None, None, None]
        var = (1 - sig) ** 2 * S**2 + sig**2
        centred = x - (1 - sig) * MU
        return sig * centred / var - (MU + (1 - sig) * S**2 * centred / var)
    return model


def grid(solver, schedule, n):
    """(α, σ) of the start and of every state the solver reports, and the state's scale.

    Euler and Heun on a VP schedule integrate x_ve = x_vp · sqrt(σ_ve² + 1).
    """
    if isinstance(schedule, FlowSchedule):
        sig = (tables.dpm_flow if solver.startswith("dpm") else tables.flow_match)(schedule, n)[1]
        sig = sig.astype(np.float64)
        return 1.0 - sig, sig, np.ones_like(sig)
    if solver == "ddim":
        ts = tables.leading_timesteps(1000, n)
        a = np.concatenate([VP.alphas_cumprod[ts], [1.0]])
        return np.sqrt(a), np.sqrt(1 - a), np.ones_like(a)
    ve = (tables.karras_vp(VP, n)[1] if solver in ("euler", "heun") else tables.dpm_vp(VP, n)[1])
    ve = ve.astype(np.float64)
    alpha = 1 / np.sqrt(ve**2 + 1)
    scale = 1 / alpha if solver in ("euler", "heun") else np.ones_like(ve)
    return alpha, ve * alpha, scale


def errors(solver, schedule, n):
    """Error half-way through the steps, and of the final sample (σ = 0).

    The half-way state measures the order: diffusers' grids are uniform in t, so near σ = 0 the
    steps in log-SNR do not shrink as N grows (the last one jumps to λ = ∞); the middle of the
    trajectory, where every step shrinks as 1/N, shows the solver's order cleanly.
    """
    if isinstance(schedule, FlowSchedule):
        grid_fn = tables.dpm_flow if solver.startswith("dpm") else tables.flow_match
        ts, sig = grid_fn(schedule, n)
        # The model looks its σ up from the solver's grid: DPM hands it int(1000 σ), so
        # t / 1000 would not be the σ the solver integrates with.
        ts_j, sig_j = jnp.asarray(ts, jnp.float32), jnp.asarray(sig[:-1], jnp.float32)

        def sigma_of(t):
            return sig_j[jnp.argmin(jnp.abs(ts_j[None, :] - t[:, None]), axis=1)]

        model, prediction = flow_model_for(sigma_of), "flow"
    else:
        model, prediction = vp_model, "epsilon"
    _, path = jdit.sampling.sample(model, jnp.asarray(NOISE), solver=solver, num_steps=n,
                                   schedule=schedule, prediction=prediction, trajectory=True)
    alpha, sigma, scale = grid(solver, schedule, n)
    x_start = NOISE.astype(np.float64) * scale[0]
    z = (x_start / scale[0] - alpha[0] * MU) / np.sqrt(alpha[0] ** 2 * S**2 + sigma[0] ** 2)
    exact = [scale[i] * (alpha[i] * MU + np.sqrt(alpha[i] ** 2 * S**2 + sigma[i] ** 2) * z)
             for i in range(1, n + 1)]
    err = [float(np.max(np.abs(np.asarray(p, np.float64) - e))) for p, e in zip(path, exact, strict=True)]
    return err[n // 2 - 1], err[-1]


CASES = [
    ("ddim", VP, 1, (10, 20, 40, 80)),
    ("dpm++1s", VP, 1, (10, 20, 40, 80)),
    ("euler", VP, 1, (10, 20, 40, 80)),
    ("dpm++2m", VP, 2, (10, 20, 40, 80)),
    ("heun", VP, 2, (10, 20, 40, 80)),
    # diffusers' dpm++3m is second order: its third-order update has an O(h³) local error
    # (see test_dpm_update_local_order) and it starts with a first-order step.
    ("dpm++3m", VP, 2, (16, 32, 64)),
    ("euler", FlowSchedule(3.0), 1, (10, 20, 40, 80)),
    ("heun", FlowSchedule(3.0), 2, (10, 20, 40, 80)),
    ("dpm++1s", FlowSchedule(3.0), 1, (10, 20, 40, 80)),
    ("dpm++2m", FlowSchedule(3.0), 2, (10, 20, 40, 80)),
    ("dpm++3m", FlowSchedule(3.0), 2, (16, 32, 64)),
]


@pytest.mark.parametrize("solver,schedule,order,steps", CASES,
                         ids=[f"{c[0]}-{type(c[1]).__name__}" for c in CASES])
def test_error_falls_at_theoretical_order(solver, schedule, order, steps):
    interior, final = zip(*(errors(solver, schedule, n) for n in steps), strict=True)
    rates = [np.log2(a / b) for a, b in zip(interior[:-1], interior[1:], strict=True)]
    print(solver, type(schedule).__name__, [f"{e:.2e}" for e in interior],
          [f"{r:.2f}" for r in rates], "final", [f"{e:.2e}" for e in final])
    assert all(r >= order - 0.25 for r in rates[-2:]), (interior, rates)  # half-way state
    assert final[-1] < final[0]


def exact_state(lam, z):
    """VP state and its exact data prediction at log-SNR λ on the trajectory of z-score z."""
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
    x = alpha * MU + np.sqrt(alpha**2 * S**2 + sigma**2) * z
    x0 = MU + alpha * S**2 * (x - alpha * MU) / (alpha**2 * S**2 + sigma**2)
    return alpha, sigma, x, x0


@pytest.mark.parametrize("order,d2_weight,local_order", [
    (1, 1.0, 2), (2, 1.0, 3),
    # diffusers' third-order update: its D2 term is half the Taylor coefficient, so the local
    # error is O(h³), no better than second order; doubling it restores O(h⁴).
    (3, 1.0, 3), (3, 2.0, 4),
])
def test_dpm_update_local_order(order, d2_weight, local_order):
    """One DPM-Solver++ update from exact history: local error O(h^local_order)."""
    from jdit.sampling.solvers import dpm_coefficients

    z = np.random.default_rng(1).standard_normal(D)
    errs = []
    for h in (0.1, 0.05, 0.025, 0.0125):
        lams = -0.5 + h * np.arange(4)  # log-SNR of s2, s1, s0, t
        states = [exact_state(lam, z) for lam in lams]
        alpha = np.array([st[0] for st in states])
        sigma = np.array([st[1] for st in states])
        c = dpm_coefficients(alpha, sigma, [1, min(order, 2), order], d2_weight)[2]
        x_next = c[0] * states[2][2] + c[1] * states[2][3] + c[2] * states[1][3] + c[3] * states[0][3]
        errs.append(np.max(np.abs(x_next - states[3][2])))
    rates = [np.log2(a / b) for a, b in zip(errs[:-1], errs[1:], strict=True)]
    assert abs(rates[-1] - local_order) <= 0.15, (errs, rates)
    if local_order < 4:
        assert all(r < local_order + 0.7 for r in rates), (errs, rates)

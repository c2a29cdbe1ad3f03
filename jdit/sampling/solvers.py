"""The solver loops. Each takes ``model(x, t) -> prediction`` (t: (B,) float32 in the model's own
timestep convention) and the starting noise, runs one ``lax.scan`` over static per-step
coefficients computed in numpy from the grids of :mod:`jdit.sampling.tables`, and returns
``(x_final, trajectory)`` with the state after every step (unused trajectories are dropped by
XLA when the caller discards them).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdit.diffusion.schedules import DDPMSchedule, FlowSchedule
from jdit.sampling import tables

Array = jax.Array
Model = Callable[[Array, Array], Array]
# The standard-normal draw of step i, shaped like x: from a key, or from given draws (step_noise)
Noise = Callable[[Array, Array], Array]


class Threaded:
    """State a model call reads and replaces once per call (a step cache), carried through the
    solver's loop beside the solver's own state: while :data:`THREADED` holds one, every
    solver's ``scan`` threads ``value`` through its iterations. Calls outside the loop (Heun's
    last step) see the loop's final value."""

    def __init__(self, value: Any) -> None:
        self.value = value


THREADED: contextvars.ContextVar[Threaded | None] = contextvars.ContextVar("threaded",
                                                                         default=None)


def _scan(step: Callable[..., Any], init: Any, xs: Any) -> tuple[Any, Any]:
    threaded = THREADED.get()
    if threaded is None:
        return jax.lax.scan(step, init, xs)

    def with_state(carry: tuple[Any, Any], x: Any) -> tuple[tuple[Any, Any], Any]:
        inner, threaded.value = carry
        inner, y = step(inner, x)
        return (inner, threaded.value), y

    (out, threaded.value), ys = jax.lax.scan(with_state, (init, threaded.value), xs)
    return out, ys


def _f32(*arrays: np.ndarray) -> tuple[Array, ...]:
    return tuple(jnp.asarray(np.asarray(a, np.float64), jnp.float32) for a in arrays)


def _tvec(x: Array, t: Array) -> Array:
    return jnp.full((x.shape[0],), t, jnp.float32)


def key_noise(key: Array) -> Noise:
    """Step i draws from ``fold_in(key, i)``."""
    return lambda i, x: jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)


def given_noise(step_noise: Array) -> Noise:
    """Step i takes ``step_noise[i]`` (shape (num_steps, *x.shape))."""
    return lambda i, x: step_noise[i].astype(jnp.float32)


def _split(out: Array, x: Array) -> tuple[Array, Array | None]:
    """A learned-sigma model returns 2C channels: the prediction, then the variance value."""
    c = x.shape[-1]
    if out.shape[-1] == 2 * c:
        return out[..., :c], out[..., c:]
    return out, None


def vp_x0_eps(out: Array, x: Array, alpha: Array, sigma: Array, prediction: str
              ) -> tuple[Array, Array]:
    """``(x0, ε)`` from a VP prediction at ``x = α x0 + σ ε``."""
    if prediction == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction == "v":
        return alpha * x - sigma * out, alpha * out + sigma * x
    x0 = out  # prediction == "sample"
    return x0, (x - alpha * x0) / sigma


# --- DDPM ancestral and DDIM (DDPMScheduler / DDIMScheduler, "leading" spacing) -------------

def ddpm(model: Model, x: Array, schedule: DDPMSchedule, num_steps: int, prediction: str,
         noise: Noise, variance: str = "fixed_small", timesteps: tuple[int, ...] | None = None,
         clip_sample: bool = False, clip_sample_range: float = 1.0) -> tuple[Array, Array]:
    """Ancestral DDPM. ``timesteps``: a custom descending grid (diffusers' ``timesteps=``;
    PixArt-DMD's one step at t = 400); ``clip_sample``: the clean estimate clipped to
    ``±clip_sample_range`` (DDPMScheduler's default for pixel models)."""
    ac = schedule.alphas_cumprod
    ts = (tables.leading_timesteps(schedule.num_train_timesteps, num_steps) if timesteps is None
          else np.asarray(timesteps, np.int64))
    prev = np.append(ts[1:], -1)
    a_t, a_prev = ac[ts], np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    beta = 1.0 - a_t / a_prev
    coef_x0 = np.sqrt(a_prev) * beta / (1.0 - a_t)
    coef_xt = np.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)
    small = np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
    has_noise = (ts > 0).astype(np.float64)
    xs = _f32(ts, np.sqrt(a_t), np.sqrt(1 - a_t), coef_x0, coef_xt, np.log(small), np.log(beta),
              has_noise) + (jnp.arange(num_steps),)

    def step(x: Array, s: tuple[Array, ...]) -> tuple[Array, Array]:
        t, alpha, sigma, cx0, cxt, log_small, log_beta, noisy, i = s
        pred, var = _split(model(x, _tvec(x, t)), x)
        x0, _ = vp_x0_eps(pred, x, alpha, sigma, prediction)
        if clip_sample:
            x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
        if variance == "learned_range":
            if var is None:
                raise ValueError("variance='learned_range' needs a model with 2C output channels")
            frac = (var + 1.0) / 2.0
            std = jnp.exp(0.5 * (frac * log_beta + (1.0 - frac) * log_small))
        elif variance == "fixed_large":
            std = jnp.exp(0.5 * log_beta)
        else:
            std = jnp.exp(0.5 * log_small)
        x = cx0 * x0 + cxt * x + noisy * std * noise(i, x)
        return x, x

    return _scan(step, x, xs)


def ddim(model: Model, x: Array, schedule: DDPMSchedule, num_steps: int, prediction: str,
         noise: Noise | None, eta: float = 0.0) -> tuple[Array, Array]:
    ac = schedule.alphas_cumprod
    n_train = schedule.num_train_timesteps
    ts = tables.leading_timesteps(n_train, num_steps)
    prev = ts - n_train // num_steps
    a_t, a_prev = ac[ts], np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
    std = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    xs = _f32(ts, np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_prev), np.sqrt(1 - a_prev - std**2),
              std) + (jnp.arange(num_steps),)

    def step(x: Array, s: tuple[Array, ...]) -> tuple[Array, Array]:
        t, alpha, sigma, alpha_prev, dir_coef, sd, i = s
        pred, _ = _split(model(x, _tvec(x, t)), x)
        x0, eps = vp_x0_eps(pred, x, alpha, sigma, prediction)
        x = alpha_prev * x0 + dir_coef * eps
        if eta > 0:
            x = x + sd * noise(i, x)
        return x, x

    return _scan(step, x, xs)


# --- DPM-Solver++ multistep (DPMSolverMultistepScheduler, midpoint, lower_order_final) ------

def dpm_orders(num_steps: int, solver_order: int) -> list[int]:
    """The order diffusers uses at each step: warm-up, and lower order at the end."""
    orders = []
    for i in range(num_steps):
        final = i == num_steps - 1  # final σ = 0: always first order
        second_last = i == num_steps - 2 and num_steps < 15
        if solver_order == 1 or i < 1 or final:
            orders.append(1)
        elif solver_order == 2 or i < 2 or second_last:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def dpm_coefficients(alpha: np.ndarray, sigma: np.ndarray, orders: list[int],
                     d2_weight: float = 1.0) -> np.ndarray:
    """Per step ``(A, B0, B1, B2)`` with ``x_next = A x + B0 m0 + B1 m1 + B2 m2``.

    ``m0, m1, m2`` are the current and two previous data predictions; the three updates of
    DPM-Solver++ (Lu et al., 2022) are linear in them, so one table covers every order.

    The third-order update follows diffusers (and the DPM-Solver reference code), whose
    second-difference term ``D2`` estimates ``h² x0''/2`` where the exponential-integrator
    expansion needs ``h² x0''``: as written the update's local error is O(h³), like the
    second-order one. ``d2_weight=2`` gives the Taylor-consistent O(h⁴) update; the default
    keeps diffusers' numbers (see tests/sampling/test_convergence.py).
    """
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at σ = 0
    coefs = np.zeros((len(orders), 4))
    for i, order in enumerate(orders):
        h = lam[i + 1] - lam[i]
        em1 = np.expm1(-h)  # e^{-h} - 1 (-1 at the final σ = 0)
        a_t = alpha[i + 1]
        coefs[i, 0] = sigma[i + 1] / sigma[i]
        phi = a_t * em1
        if order == 1:
            coefs[i, 1] = -phi
            continue
        r0 = (lam[i] - lam[i - 1]) / h
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        if order == 2:
            coefs[i, 1:] = -phi * np.array([1.0, 0.0, 0.0]) - 0.5 * phi * d1_0
            continue
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_1 = np.array([0.0, 1.0, -1.0]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        psi = a_t * (em1 / h + 1.0)
        chi = a_t * ((em1 + h) / h**2 - 0.5)
        coefs[i, 1:] = -phi * np.array([1.0, 0.0, 0.0]) + psi * d1 - d2_weight * chi * d2
    return coefs


def dpm(model: Model, x: Array, schedule: DDPMSchedule | FlowSchedule, num_steps: int,
        prediction: str, order: int) -> tuple[Array, Array]:
    if isinstance(schedule, FlowSchedule):
        ts, sig = tables.dpm_flow(schedule, num_steps)
        alpha, sigma = 1.0 - sig.astype(np.float64), sig.astype(np.float64)
    else:
        ts, sig = tables.dpm_vp(schedule, num_steps)
        s64 = sig.astype(np.float64)
        alpha = 1.0 / np.sqrt(s64**2 + 1.0)
        sigma = s64 * alpha
    coefs = dpm_coefficients(alpha, sigma, dpm_orders(num_steps, order))
    xs = _f32(ts, alpha[:-1], sigma[:-1], *coefs.T)

    def step(carry: tuple[Array, Array, Array], s: tuple[Array, ...]
             ) -> tuple[tuple[Array, Array, Array], Array]:
        x, m1, m2 = carry
        t, a_s, s_s, ca, c0, c1, c2 = s
        pred, _ = _split(model(x, _tvec(x, t)), x)
        if prediction == "flow":
            m0 = x - s_s * pred
        else:
            m0, _ = vp_x0_eps(pred, x, a_s, s_s, prediction)
        x = ca * x + c0 * m0 + c1 * m1 + c2 * m2
        return (x, m0, m1), x

    zeros = jnp.zeros_like(x)
    (x, _, _), path = _scan(step, (x, zeros, zeros), xs)
    return x, path


# --- Euler and Heun (EulerDiscrete/HeunDiscrete on VP; FlowMatchEuler/FlowMatchHeun) --------

def _karras_derivative(model: Model, x: Array, t: Array, sigma: Array, prediction: str) -> Array:
    """dx/dσ of the VE probability-flow ODE, the model seeing ``x / sqrt(σ² + 1)``."""
    scale = jnp.sqrt(sigma**2 + 1.0)
    pred, _ = _split(model(x / scale, _tvec(x, t)), x)
    if prediction == "epsilon":
        x0 = x - sigma * pred
    elif prediction == "v":
        x0 = pred * (-sigma / scale) + x / (sigma**2 + 1.0)
    else:
        x0 = pred
    return (x - x0) / sigma


def _flow_derivative(model: Model, x: Array, t: Array, sigma: Array, prediction: str) -> Array:
    return _split(model(x, _tvec(x, t)), x)[0]


def _grid(schedule: DDPMSchedule | FlowSchedule, num_steps: int
          ) -> tuple[np.ndarray, np.ndarray, float, Callable[..., Array]]:
    if isinstance(schedule, FlowSchedule):
        ts, sig = tables.flow_match(schedule, num_steps)
        return ts, sig, 1.0, _flow_derivative
    ts, sig, init_sigma = tables.karras_vp(schedule, num_steps)
    return ts, sig, init_sigma, _karras_derivative


def euler(model: Model, x: Array, schedule: DDPMSchedule | FlowSchedule, num_steps: int,
          prediction: str) -> tuple[Array, Array]:
    ts, sig, init_sigma, derivative = _grid(schedule, num_steps)
    xs = _f32(ts, sig[:-1], sig[1:])

    def step(x: Array, s: tuple[Array, ...]) -> tuple[Array, Array]:
        t, sigma, sigma_next = s
        x = x + derivative(model, x, t, sigma, prediction) * (sigma_next - sigma)
        return x, x

    return _scan(step, x * init_sigma, xs)


def heun(model: Model, x: Array, schedule: DDPMSchedule | FlowSchedule, num_steps: int,
         prediction: str) -> tuple[Array, Array]:
    """Heun's second-order method; the last step (to σ = 0) is an Euler step."""
    ts, sig, init_sigma, derivative = _grid(schedule, num_steps)
    xs = _f32(ts[:-1], ts[1:], sig[:-2], sig[1:-1])

    def step(x: Array, s: tuple[Array, ...]) -> tuple[Array, Array]:
        t, t_next, sigma, sigma_next = s
        dt = sigma_next - sigma
        d1 = derivative(model, x, t, sigma, prediction)
        d2 = derivative(model, x + d1 * dt, t_next, sigma_next, prediction)
        x = x + 0.5 * (d1 + d2) * dt
        return x, x

    x, path = _scan(step, x * init_sigma, xs)
    t_last, s_last = _f32(ts[-1:], sig[-2:-1])
    x = x - derivative(model, x, t_last[0], s_last[0], prediction) * s_last[0]
    return x, jnp.concatenate([path, x[None]])


# --- SA-Solver (SASolverScheduler: data prediction, predictor-corrector, PixArt-Σ's sampler) ---

def _exp_integral(k: int, start: float, end: float, tau: float) -> float:
    """``∫_start^end e^{(1+τ²)λ} λ^k dλ`` in closed form, k <= 3 (SA-Solver's data-prediction
    integrals, diffusers' ``get_coefficients_exponential_positive``)."""
    c = 1.0 + tau**2
    e, s = c * end, c * start
    decay = np.exp(-(e - s))
    poly = {
        0: lambda z: 1.0,
        1: lambda z: z - 1.0,
        2: lambda z: z**2 - 2 * z + 2,
        3: lambda z: z**3 - 3 * z**2 + 6 * z - 6,
    }[k]
    return float(np.exp(e) * (poly(e) - poly(s) * decay) / c ** (k + 1))


def _lagrange(lams: list[float]) -> np.ndarray:
    """Row i: coefficients (highest power first) of the Lagrange basis polynomial ℓ_i."""
    n = len(lams)
    rows = np.zeros((n, n))
    for i in range(n):
        others = [lams[j] for j in range(n) if j != i]
        denom = np.prod([lams[i] - o for o in others]) if others else 1.0
        rows[i] = np.poly(others) / denom if others else np.array([1.0])
    return rows


def sa_coefficients(order: int, lam_s0: float, lam_t: float, lams: list[float], tau: float,
                    corrector: bool, lam_prev: float | None = None) -> list[float]:
    """Weights of the data predictions at ``lams`` in one SA-Solver step (before the
    ``(1+τ²) σ_t e^{-τ² λ_t}`` factor), with diffusers' order-2 adjustment."""
    basis = _lagrange(lams)
    coefs = [sum(basis[i][j] * _exp_integral(order - 1 - j, lam_s0, lam_t, tau)
                 for j in range(order)) for i in range(order)]
    if order == 2:
        c, h = 1.0 + tau**2, lam_t - lam_s0
        inner = (h * c - 1.0 + np.exp(-c * h)) / c**2
        if corrector:
            extra = np.exp(c * lam_t) * (h / 2 - inner / h)
        else:
            extra = np.exp(c * lam_t) * (h**2 / 2 - inner) / (lam_s0 - lam_prev)
        coefs[0] += extra
        coefs[1] -= extra
    return coefs


def sa_solver(model: Model, x: Array, schedule: DDPMSchedule, num_steps: int, prediction: str,
              noise: Noise, predictor_order: int = 2, corrector_order: int = 2,
              tau_window: tuple[float, float] = (200.0, 800.0)) -> tuple[Array, Array]:
    """SA-Solver (Xue et al., 2023) as diffusers' SASolverScheduler runs it: a stochastic
    Adams-Bashforth predictor and an Adams-Moulton corrector in PEC mode, τ = 1 for
    timesteps inside ``tau_window`` and 0 outside, ending at the smallest training σ."""
    n = num_steps
    ts = np.linspace(0, schedule.num_train_timesteps - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    k = schedule.karras_sigmas
    ve = np.concatenate([np.interp(ts, np.arange(len(k)), k), [k[0]]]).astype(np.float32)
    ve = ve.astype(np.float64)
    alpha = 1.0 / np.sqrt(ve**2 + 1.0)
    sigma = ve * alpha
    lam = np.log(alpha) - np.log(sigma)
    taus = np.where((ts >= tau_window[0]) & (ts <= tau_window[1]), 1.0, 0.0)
    hist_len = max(predictor_order, corrector_order - 1)
    width = hist_len + 1  # weights for the newest output and the stored history

    # Static tables: x_cur = K x_pred + Ac x_last + Σ C_j m_{i-j} + Nc n_last;
    #                x_next = Ap x_cur + Σ P_j m_{i-j} + Np n_i.
    K, Ac, Nc, Ap, Np = (np.zeros(n) for _ in range(5))
    C, P = np.zeros((n, width)), np.zeros((n, width))
    done, corrector_prev = 0, 0
    for i in range(n):
        if i == 0:
            K[i] = 1.0
        else:
            c_order, tau = corrector_prev, taus[i - 1]
            lams = [lam[i - j] for j in range(c_order)]
            w = sa_coefficients(c_order, lam[i - 1], lam[i], lams, tau, corrector=True)
            h = lam[i] - lam[i - 1]
            scale = (1 + tau**2) * sigma[i] * np.exp(-(tau**2) * lam[i])
            C[i, :c_order] = scale * np.array(w)
            Ac[i] = np.exp(-(tau**2) * h) * sigma[i] / sigma[i - 1]
            Nc[i] = sigma[i] * np.sqrt(-np.expm1(-2 * tau**2 * h))
        p_order = min(min(predictor_order, n - i), done + 1)
        corrector_prev = min(min(corrector_order, n - i + 1), done + 2)
        tau = taus[i]
        lams = [lam[i - j] for j in range(p_order)]
        w = sa_coefficients(p_order, lam[i], lam[i + 1], lams, tau, corrector=False,
                            lam_prev=lam[i - 1] if p_order == 2 else None)
        h = lam[i + 1] - lam[i]
        P[i, :p_order] = (1 + tau**2) * sigma[i + 1] * np.exp(-(tau**2) * lam[i + 1]) * np.array(w)
        Ap[i] = np.exp(-(tau**2) * h) * sigma[i + 1] / sigma[i]
        Np[i] = sigma[i + 1] * np.sqrt(-np.expm1(-2 * tau**2 * h))
        done = min(done + 1, hist_len)
    xs = _f32(ts, alpha[:-1], sigma[:-1], K, Ac, C, Nc, Ap, P, Np) + (jnp.arange(n),)

    def step(carry: tuple[Array, ...], s: tuple[Array, ...]) -> tuple[tuple[Array, ...], Array]:
        x_pred, x_last, n_last, hist = carry
        t, a_s, s_s, k_i, ac, c, nc, ap, p, np_, i = s
        pred, _ = _split(model(x_pred, _tvec(x_pred, t)), x_pred)
        m, _ = vp_x0_eps(pred, x_pred, a_s, s_s, prediction)
        outputs = jnp.concatenate([m[None], hist], axis=0)  # newest first
        weighted = lambda w: jnp.tensordot(w, outputs, axes=1)  # noqa: E731
        x_cur = k_i * x_pred + ac * x_last + weighted(c) + nc * n_last
        drawn = noise(i, x_pred)
        x_next = ap * x_cur + weighted(p) + np_ * drawn
        return (x_next, x_cur, drawn, outputs[:-1]), x_next

    zeros = jnp.zeros_like(x)
    init = (x, zeros, zeros, jnp.zeros((hist_len,) + x.shape, x.dtype))
    (x, _, _, _), path = _scan(step, init, xs)
    return x, path


# --- Latent consistency models (LCMScheduler: PixArt-LCM, LCM-LoRA) --------------------------

def lcm_boundary(timesteps: np.ndarray, timestep_scaling: float = 10.0, sigma_data: float = 0.5
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(c_skip, c_out)`` of the consistency parameterisation ``f = c_skip x + c_out x0``
    at discrete timesteps (LCM's boundary condition: ``f = x`` at t = 0)."""
    t = np.asarray(timesteps, np.float64) * timestep_scaling
    return sigma_data**2 / (t**2 + sigma_data**2), t / np.sqrt(t**2 + sigma_data**2)


def lcm(model: Model, x: Array, schedule: DDPMSchedule, num_steps: int, prediction: str,
        noise: Noise, original_steps: int = 50, timestep_scaling: float = 10.0
        ) -> tuple[Array, Array]:
    """Multistep consistency sampling (Luo et al., 2023) as diffusers' LCMScheduler runs it:
    at each grid timestep the model's clean estimate goes through the consistency boundary
    condition, and all but the last step re-noise it to the next timestep with a fresh draw."""
    ac = schedule.alphas_cumprod
    ts = tables.lcm_timesteps(schedule.num_train_timesteps, num_steps, original_steps)
    prev = np.append(ts[1:], ts[-1])
    c_skip, c_out = lcm_boundary(ts, timestep_scaling)
    renoise = np.arange(num_steps) < num_steps - 1
    xs = _f32(ts, np.sqrt(ac[ts]), np.sqrt(1 - ac[ts]), c_skip, c_out,
              np.where(renoise, np.sqrt(ac[prev]), 1.0), np.where(renoise, np.sqrt(1 - ac[prev]), 0.0)
              ) + (jnp.arange(num_steps),)

    def step(x: Array, s: tuple[Array, ...]) -> tuple[Array, Array]:
        t, alpha, sigma, skip, out, alpha_next, sigma_next, i = s
        pred, _ = _split(model(x, _tvec(x, t)), x)
        x0, _ = vp_x0_eps(pred, x, alpha, sigma, prediction)
        denoised = out * x0 + skip * x
        x = alpha_next * denoised + sigma_next * noise(i, x)
        return x, x

    return _scan(step, x, xs)


def flow_lcm(model: Model, x: Array, schedule: FlowSchedule, num_steps: int, prediction: str,
             noise: Noise) -> tuple[Array, Array]:
    """Multistep consistency sampling of a flow model (FlowMatchLCMScheduler): on the flow
    Euler grid, the clean estimate ``x − σ v`` (the consistency function of a flow model, which
    is ``x`` itself at σ = 0) is re-noised to the next σ with a fresh draw."""
    ts, sig = tables.flow_match(schedule, num_steps)
    xs = _f32(ts, sig[:-1], sig[1:]) + (jnp.arange(num_steps),)

    def step(x: Array, s: tuple[Array, ...]) -> tuple[Array, Array]:
        t, sigma, sigma_next, i = s
        v, _ = _split(model(x, _tvec(x, t)), x)
        x0 = x - sigma * v
        x = (1 - sigma_next) * x0 + sigma_next * noise(i, x)
        return x, x

    return _scan(step, x, xs)


# --- Continuous-time consistency, TrigFlow (SCMScheduler: SANA-Sprint) -----------------------

def scm_timesteps(num_steps: int, max_timestep: float = 1.57080,
                  intermediate_timestep: float | None = 1.3) -> np.ndarray:
    """SCMScheduler's TrigFlow times, ``num_steps + 1`` of them ending at 0: ``[max,
    intermediate, 0]`` for two steps (SANA-Sprint's default), else evenly spaced from ``max``."""
    if not 0.0 < max_timestep <= np.pi / 2 + 1e-4:
        raise ValueError(f"max_timestep must lie in (0, π/2], got {max_timestep}")
    if num_steps == 2 and intermediate_timestep is not None:
        if not 0.0 < intermediate_timestep < max_timestep:
            raise ValueError(f"intermediate_timestep must lie in (0, max_timestep), got "
                             f"{intermediate_timestep}")
        return np.array([max_timestep, intermediate_timestep, 0.0], np.float32)
    return np.linspace(max_timestep, 0.0, num_steps + 1, dtype=np.float32)


def scm(model: Model, x: Array, schedule: FlowSchedule, num_steps: int, prediction: str,
        noise: Noise, max_timestep: float = 1.57080, intermediate_timestep: float | None = 1.3,
        sigma_data: float = 0.5) -> tuple[Array, Array]:
    """sCM sampling in TrigFlow time (Lu & Song, 2024) as diffusers' SCMScheduler with
    SanaSprintPipeline runs it, for a model that predicts the flow velocity.

    The state is ``x = cos(τ) x0 + sin(τ) z`` at data scale ``sigma_data`` (starting from
    ``sigma_data · noise``); the model sees it as a flow state at ``s = sin τ / (cos τ + sin τ)``
    (timestep 1000 s), and its velocity ``v`` becomes the TrigFlow prediction ``F``. Each step
    takes ``x0 = cos τ x − sin τ F`` and re-noises it to the next time with a fresh draw (the last
    step's next time is 0: its draw is multiplied by sin 0). Returns the final
    ``x0 / sigma_data`` (and the states divided by ``sigma_data``)."""
    n_train = schedule.num_train_timesteps
    tau = scm_timesteps(num_steps, max_timestep, intermediate_timestep).astype(np.float64)
    cos, sin = np.cos(tau), np.sin(tau)
    s = sin[:-1] / (cos[:-1] + sin[:-1])
    norm = np.sqrt(s**2 + (1 - s) ** 2)
    xs = _f32(s * n_train, s, norm, cos[:-1], sin[:-1], cos[1:], sin[1:]) + (jnp.arange(num_steps),)

    def step(x: Array, p: tuple[Array, ...]) -> tuple[Array, Array]:
        t, s_, nrm, c, si, c_next, s_next, i = p
        x_in = x / sigma_data * nrm
        v, _ = _split(model(x_in, _tvec(x, t)), x)
        f = ((1 - 2 * s_) * x_in + (1 - 2 * s_ + 2 * s_**2) * v) / nrm * sigma_data
        x0 = c * x - si * f
        x = c_next * x0 + s_next * sigma_data * noise(i, x)  # the last step: x0 itself
        return x, x / sigma_data

    x, path = _scan(step, x * sigma_data, xs)
    return x / sigma_data, path

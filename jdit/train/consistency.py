"""Latent consistency distillation (LCM, Luo et al. 2023): a few-step student from any teacher.

The student learns the teacher's probability-flow ODE as a consistency function
``f(x_σ, σ) ≈ x0``: on a grid of ``grid_steps`` noise levels, a noised training image ``x_σ``
goes one grid step down the ODE with the frozen teacher (classifier-free guided at
``guidance_scale``, one Euler/DDIM step), and the student at ``(x_σ, σ)`` is pulled toward
the target network at the point that step reached (``stop_gradient``). The target network is
the run's EMA (``train.ema_decay``: LCM's μ). The guidance is distilled into the student:
it samples unguided.

- **Flow teachers**: ``f(x, σ) = x − σ v(x, σ)`` (the boundary condition ``f(x, 0) = x`` holds
  by construction); the grid is the teacher's shifted σ at ``n / grid_steps``; the student
  samples with the ``lcm`` solver on a ``FlowSchedule`` (FlowMatchLCMScheduler).
- **DDPM teachers**: LCM's ``f = c_skip x + c_out x̂0`` (:func:`jdit.sampling.solvers.lcm_boundary`)
  on the DDIM grid ``k − 1, 2k − 1, …`` (``k = 1000 // grid_steps``), the teacher's step a DDIM
  step; the student samples with the ``lcm`` solver (LCMScheduler, ``original_steps =
  grid_steps``).

The distance is LCM's pseudo-Huber ``sqrt(mean(d²) + c²) − c`` per example (``huber_c``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdit.config import section
from jdit.diffusion import DDPMSchedule, FlowSchedule, make_schedule
from jdit.sampling.solvers import lcm_boundary, vp_x0_eps

Array = jax.Array


def flow_grid(schedule: FlowSchedule, steps: int) -> np.ndarray:
    """σ_0 = 0 < σ_1 < … < σ_N = 1: the teacher's shift applied to ``n / N``."""
    return np.asarray(schedule.shift_sigma(np.arange(steps + 1) / steps), np.float64)


def ddim_grid(schedule: DDPMSchedule, steps: int) -> np.ndarray:
    """Timesteps ``-1 (the clean end), k − 1, 2k − 1, …, T − 1`` with ``k = T // steps``."""
    k = schedule.num_train_timesteps // steps
    return np.concatenate([[-1], np.arange(1, steps + 1) * k - 1])


def pseudo_huber(a: Array, b: Array, c: float) -> Array:
    """``sqrt(mean((a − b)²) + c²) − c`` per example."""
    d = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
    return jnp.sqrt(d + c * c) - c


def expand(v: Array, x: Array) -> Array:
    """Per-example values ``v`` (B,) broadcast against ``x``."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _conditions(module: nn.Module, batch: Mapping[str, Array], null: tuple[Array, Array] | None
                ) -> tuple[dict[str, Array], dict[str, Array]]:
    """The batch's condition and the null one (the teacher's two guidance halves)."""
    if "labels" in batch:
        return ({"labels": batch["labels"]},
                {"labels": jnp.full_like(batch["labels"], module.num_classes)})
    if null is None:
        raise ValueError("consistency distillation of a text model needs its null caption "
                         "(the teacher is classifier-free guided)")
    b = batch["context"].shape[0]
    micro = {k: batch[k] for k in ("resolution", "aspect_ratio") if k in batch}
    cond = {"context": batch["context"], "context_mask": batch["context_mask"], **micro}
    uncond = {"context": jnp.broadcast_to(null[0], batch["context"].shape),
              "context_mask": jnp.broadcast_to(null[1], (b, null[1].shape[-1])), **micro}
    return cond, uncond


def _guided(teacher: tuple[nn.Module, Any], w: float, x: Array, t: Array,
            cond: dict[str, Array], uncond: dict[str, Array]) -> Array:
    """The teacher's prediction at ``(x, t)``, classifier-free guided at ``w`` (one batched
    forward of both halves)."""
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)
    out = teacher[0].apply({"params": teacher[1]}, jnp.concatenate([x, x]),
                           jnp.concatenate([t, t]), **both)
    out = out[..., :x.shape[-1]]  # a learned-sigma teacher: its prediction channels
    c_out, u_out = jnp.split(out, 2)
    return u_out + w * (c_out - u_out)


def make_consistency_loss(module: nn.Module, teacher: tuple[nn.Module, Any],
                          diffusion: Mapping[str, Any], distill: Mapping[str, Any],
                          null: tuple[Array, Array] | None
                          ) -> Callable[..., Array]:
    """``loss(params, batch, rng, target_params, step)`` of latent consistency distillation."""
    diffusion, distill = section("diffusion", diffusion), section("distill", distill)
    schedule = make_schedule(diffusion)
    steps = int(distill["grid_steps"])
    w = float(distill["guidance_scale"])
    c = float(distill["huber_c"])
    if steps < 1:
        raise ValueError(f"distill.grid_steps must be >= 1, got {steps}")
    if c <= 0:
        raise ValueError(f"distill.huber_c must be > 0, got {c}")
    flow = isinstance(schedule, FlowSchedule)
    if flow:
        grid = jnp.asarray(flow_grid(schedule, steps), jnp.float32)
    else:
        ts = ddim_grid(schedule, steps)
        ac = np.concatenate([[1.0], schedule.alphas_cumprod])[ts + 1]  # ᾱ at -1 is 1
        c_skip, c_out = lcm_boundary(np.maximum(ts, 0))
        c_skip[0], c_out[0] = 1.0, 0.0  # the clean end: f(x) = x
        table = {k: jnp.asarray(v, jnp.float32) for k, v in dict(
            t=np.maximum(ts, 0), alpha=np.sqrt(ac), sigma=np.sqrt(1 - ac), skip=c_skip,
            out=c_out).items()}

    def conditions(batch: Mapping[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
        return _conditions(module, batch, null)

    def guided_teacher(x: Array, t: Array, cond: dict[str, Array], uncond: dict[str, Array]
                       ) -> Array:
        return _guided(teacher, w, x, t, cond, uncond)

    def loss(params: Any, batch: Mapping[str, Array], rng: Array, target: Any,
             step: Array | None = None) -> Array:
        x0 = batch["images"].astype(jnp.float32)
        b = x0.shape[0]
        rng_n, rng_e = jax.random.split(rng)
        n = jax.random.randint(rng_n, (b,), 1, steps + 1)
        eps = jax.random.normal(rng_e, x0.shape)
        cond, uncond = conditions(batch)
        t_module_apply = lambda p, x, t: module.apply({"params": p}, x, t, **cond)  # noqa: E731
        if flow:
            s, s_prev = expand(grid[n], x0), expand(grid[n - 1], x0)
            x = (1 - s) * x0 + s * eps
            t, t_prev = grid[n] * schedule.num_train_timesteps, grid[n - 1] * schedule.num_train_timesteps
            v_teacher = guided_teacher(x, t, cond, uncond)
            x_prev = jax.lax.stop_gradient(x + (s_prev - s) * v_teacher)
            f = x - s * t_module_apply(params, x, t)[..., :x0.shape[-1]]
            v_target = t_module_apply(target, x_prev, t_prev)[..., :x0.shape[-1]]
            # at the clean end (σ' = 0) the target is x_prev itself, whatever the model says
            f_target = jnp.where(s_prev > 0, x_prev - s_prev * v_target, x_prev)
        else:
            g = {k: v[n] for k, v in table.items()}
            p = {k: v[n - 1] for k, v in table.items()}
            a, sg = expand(g["alpha"], x0), expand(g["sigma"], x0)
            a_p, sg_p = expand(p["alpha"], x0), expand(p["sigma"], x0)
            x = a * x0 + sg * eps
            out_t = guided_teacher(x, g["t"], cond, uncond)
            x0_t, eps_t = vp_x0_eps(out_t, x, a, sg, diffusion["prediction"])
            x_prev = jax.lax.stop_gradient(a_p * x0_t + sg_p * eps_t)  # one DDIM step

            def consistency(p_: Any, x_: Array, tt: dict[str, Array], a_: Array, s_: Array
                            ) -> Array:
                pred = t_module_apply(p_, x_, tt["t"])[..., :x0.shape[-1]]
                x0_ = vp_x0_eps(pred, x_, a_, s_, diffusion["prediction"])[0]
                return expand(tt["skip"], x_) * x_ + expand(tt["out"], x_) * x0_

            f = consistency(params, x, g, a, sg)
            f_target = consistency(target, x_prev, p, a_p, jnp.maximum(sg_p, 1e-8))
        f_target = jax.lax.stop_gradient(f_target)
        return jnp.mean(pseudo_huber(f, f_target, c))

    return loss


# --- Continuous-time consistency distillation in TrigFlow (sCM; SANA-Sprint) ----------------

def trigflow_velocity(v: Array, y: Array, s: Array) -> Array:
    """A flow model's velocity ``v = ε − x0`` at the flow state ``y = (1 − s) x0 + s ε`` as the
    TrigFlow velocity ``F = −sin τ x0 + cos τ ε`` at ``s = sin τ / (cos τ + sin τ)`` (diffusers'
    SanaSprintPipeline makes the same conversion)."""
    norm = jnp.sqrt(s**2 + (1 - s) ** 2)
    return ((1 - 2 * s) * y + (1 - 2 * s + 2 * s**2) * v) / norm


def trigflow_model(module: nn.Module, n_train: int, cond: dict[str, Array]
                   ) -> Callable[[Any, Array, Array], Array]:
    """``F(params, x / σ_d, τ)``: a jdit flow model seen in TrigFlow time (per-example τ)."""
    def f(params: Any, x_scaled: Array, tau: Array) -> Array:
        c, s_ = jnp.cos(tau), jnp.sin(tau)
        s = s_ / (c + s_)
        y = x_scaled / expand(c + s_, x_scaled)  # x/σ_d · sqrt(s² + (1 − s)²)
        v = module.apply({"params": params}, y, s * n_train, **cond)[..., :y.shape[-1]]
        return trigflow_velocity(v, y, expand(s, y))
    return f


def make_scm_loss(module: nn.Module, teacher: tuple[nn.Module, Any],
                  diffusion: Mapping[str, Any], distill: Mapping[str, Any],
                  null: tuple[Array, Array] | None) -> Callable[..., Array]:
    """``loss(params, batch, rng, target, step)`` of continuous-time consistency distillation
    (sCD, Lu & Song 2024) of a flow teacher in TrigFlow time, as SANA-Sprint trains.

    The consistency function is ``f = cos τ x − sin τ σ_d F_θ(x/σ_d, τ)``; its derivative along
    the teacher's ODE (``dx/dτ = σ_d F_teacher``, guided) comes from one ``jax.jvp`` of the
    student (tangents scaled by ``cos τ sin τ``, as sCM does for stability). The student is
    pulled by ``‖F_θ − sg(F_θ + g)‖²`` with ``g = −cos²τ (σ_d F_θ − dx/dτ) − r cos τ sin τ
    (x + σ_d dF_θ/dτ)``, tangent-normalised (``g / (‖g‖_rms + 0.1)``), ``r`` warming up
    linearly over ``distill.tangent_warmup`` steps. τ = arctan(σ / σ_d) with σ log-normal
    (``distill.p_mean``, ``distill.p_std``)."""
    diffusion, distill = section("diffusion", diffusion), section("distill", distill)
    schedule = make_schedule(diffusion)
    if not isinstance(schedule, FlowSchedule):
        raise ValueError("distill.method='scm' distils flow teachers (diffusion.objective "
                         "'flow'); use 'consistency' for DDPM ones")
    n_train = schedule.num_train_timesteps
    w = float(distill["guidance_scale"])
    sd = float(distill["sigma_data"])
    p_mean, p_std = float(distill["p_mean"]), float(distill["p_std"])
    warmup = float(distill["tangent_warmup"])

    def loss(params: Any, batch: Mapping[str, Array], rng: Array, target: Any,
             step: Array | None = None) -> Array:
        x0 = batch["images"].astype(jnp.float32) * sd  # TrigFlow data: the flow data × σ_d
        b = x0.shape[0]
        rng_t, rng_z = jax.random.split(rng)
        sigma = jnp.exp(p_mean + p_std * jax.random.normal(rng_t, (b,)))
        tau = jnp.arctan(sigma / sd)
        c, s_ = expand(jnp.cos(tau), x0), expand(jnp.sin(tau), x0)
        x = c * x0 + s_ * sd * jax.random.normal(rng_z, x0.shape)
        cond, uncond = _conditions(module, batch, null)
        # the teacher's TrigFlow velocity dx/dτ = σ_d F_teacher, guided
        s = jnp.sin(tau) / (jnp.cos(tau) + jnp.sin(tau))
        y = x / sd / (c + s_)
        v_t = _guided(teacher, w, y, s * n_train, cond, uncond)
        dxdt = jax.lax.stop_gradient(sd * trigflow_velocity(v_t, y, expand(s, y)))
        student = trigflow_model(module, n_train, cond)
        frozen = jax.lax.stop_gradient(params)
        f_minus, df_dt = jax.jvp(lambda xs, tt: student(frozen, xs, tt), (x / sd, tau),
                                 (c * s_ * dxdt / sd, jnp.cos(tau) * jnp.sin(tau)))
        r = 1.0 if warmup <= 0 or step is None else jnp.minimum(1.0, step / warmup)
        g = -c**2 * (sd * f_minus - dxdt) - r * (c * s_ * x + sd * df_dt)
        rms = jnp.sqrt(jnp.mean(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
        g = jax.lax.stop_gradient(g / (rms + 0.1))
        f_theta = student(params, x / sd, tau)
        return jnp.mean(jnp.square(f_theta - jax.lax.stop_gradient(f_minus) - g))

    return loss

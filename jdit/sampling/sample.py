"""``sample``: the whole sampling loop as one compiled program."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jdit.diffusion.schedules import DDPMSchedule, FlowSchedule
from jdit.sampling import solvers

Array = jax.Array

VP_SOLVERS = ("ddpm", "ddim", "dpm++1s", "dpm++2m", "dpm++3m", "euler", "heun", "sa-solver")
FLOW_SOLVERS = ("dpm++1s", "dpm++2m", "dpm++3m", "euler", "heun")
VP_PREDICTIONS = ("epsilon", "v", "sample")
FLOW_PREDICTIONS = ("flow",)
STOCHASTIC = ("ddpm", "sa-solver")
DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _check(solver: str, num_steps: int, schedule: Any, prediction: str, eta: float,
           variance: str, key: Any) -> None:
    if isinstance(schedule, FlowSchedule):
        kind, names, preds = "FlowSchedule", FLOW_SOLVERS, FLOW_PREDICTIONS
    elif isinstance(schedule, DDPMSchedule):
        kind, names, preds = "DDPMSchedule", VP_SOLVERS, VP_PREDICTIONS
    else:
        raise ValueError(f"schedule must be a DDPMSchedule or a FlowSchedule, got {type(schedule).__name__}")
    if solver not in names:
        raise ValueError(f"unknown solver {solver!r} for a {kind}; valid: {', '.join(names)}")
    if getattr(schedule, "grid", "scheduler") != "scheduler" and solver not in ("euler", "heun"):
        raise ValueError(f"a FlowSchedule with grid={schedule.grid!r} samples with the euler or "
                         f"heun solver (the grid of the scheduler that takes sigmas), not "
                         f"{solver!r}")
    if prediction not in preds:
        raise ValueError(f"a {kind} serves predictions {preds}, not {prediction!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if isinstance(schedule, DDPMSchedule) and num_steps > schedule.num_train_timesteps:
        raise ValueError(f"num_steps {num_steps} exceeds the schedule's "
                         f"{schedule.num_train_timesteps} training timesteps")
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"variance must be one of {DDPM_VARIANCES}, got {variance!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if key is None and (solver in STOCHASTIC or (solver == "ddim" and eta > 0)):
        raise ValueError(f"solver {solver!r} draws noise: pass key=jax.random.key(...)")


@functools.partial(jax.jit, static_argnames=(
    "model_fn", "solver", "num_steps", "schedule", "prediction", "eta", "variance", "trajectory"))
def _sample(model_fn: Callable[..., Array], noise: Array, args: tuple[Any, ...],
            key: Array | None, *, solver: str, num_steps: int, schedule: DDPMSchedule | FlowSchedule,
            prediction: str, eta: float, variance: str, trajectory: bool
            ) -> Array | tuple[Array, Array]:
    x = noise.astype(jnp.float32)

    def model(x: Array, t: Array) -> Array:
        out = model_fn(x, t, *args)
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (x.shape[-1], 2 * x.shape[-1]):
            raise ValueError(f"model_fn returned shape {out.shape} for input {x.shape}; expected "
                             f"the input shape with {x.shape[-1]} or {2 * x.shape[-1]} channels")
        return out.astype(jnp.float32)

    if solver == "ddpm":
        out = solvers.ddpm(model, x, schedule, num_steps, prediction, key, variance)
    elif solver == "ddim":
        out = solvers.ddim(model, x, schedule, num_steps, prediction, key, eta)
    elif solver.startswith("dpm++"):
        out = solvers.dpm(model, x, schedule, num_steps, prediction, order=int(solver[5]))
    elif solver == "sa-solver":
        out = solvers.sa_solver(model, x, schedule, num_steps, prediction, key)
    elif solver == "euler":
        out = solvers.euler(model, x, schedule, num_steps, prediction)
    else:
        out = solvers.heun(model, x, schedule, num_steps, prediction)
    return out if trajectory else out[0]


def sample(
    model_fn: Callable[..., Array],
    noise: Array,
    *,
    solver: str = "dpm++2m",
    num_steps: int = 20,
    schedule: DDPMSchedule | FlowSchedule,
    prediction: str = "epsilon",
    key: Array | None = None,
    eta: float = 0.0,
    variance: str = "fixed_small",
    args: tuple[Any, ...] = (),
    trajectory: bool = False,
) -> Array | tuple[Array, Array]:
    """Integrate from ``noise`` (standard normal, NHWC) to a sample, in one jitted program.

    ``model_fn(x, t, *args)`` returns the model's prediction for latents ``x`` at timesteps
    ``t`` (B,) in the model's convention (DDPM 0..999; flow 1000 σ). With a ``DDPMSchedule`` the
    solvers are ``ddpm`` (ancestral; ``variance`` fixed_small | fixed_large | learned_range),
    ``ddim`` (``eta``), ``dpm++1s``/``2m``/``3m``, ``euler`` and ``heun`` (Karras-style VE
    ODE) and ``sa-solver`` (SA-Solver, stochastic predictor-corrector, PixArt-Σ's sampler); with a
    ``FlowSchedule`` the flow ODE is integrated by ``euler``, ``heun`` and the ``dpm++`` solvers. Each reproduces its diffusers scheduler at default settings (DDIM and
    DDPM without clipping). A model returning 2C channels (learned sigma) is guided and
    integrated on its first C channels.

    Compiled once per (model_fn, shapes, solver, steps, schedule, prediction): keep passing the
    same ``model_fn`` object and put arrays that change (parameters, text features, guidance
    scale) in ``args``; or call ``sample`` inside your own ``jax.jit``. With
    ``trajectory=True`` it returns ``(x, states)``, the state after every step stacked first.
    """
    _check(solver, num_steps, schedule, prediction, eta, variance, key)
    return _sample(model_fn, noise, tuple(args), key, solver=solver, num_steps=num_steps,
                   schedule=schedule, prediction=prediction, eta=float(eta), variance=variance,
                   trajectory=trajectory)

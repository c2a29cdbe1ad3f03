"""``sample``: the whole sampling loop as one compiled program."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jdit.diffusion.schedules import DDPMSchedule, FlowSchedule
from jdit.sampling import solvers, tables

Array = jax.Array

VP_SOLVERS = ("ddpm", "ddim", "dpm++1s", "dpm++2m", "dpm++3m", "euler", "heun", "sa-solver", "lcm")
FLOW_SOLVERS = ("dpm++1s", "dpm++2m", "dpm++3m", "euler", "heun", "lcm", "scm")
VP_PREDICTIONS = ("epsilon", "v", "sample")
FLOW_PREDICTIONS = ("flow",)
STOCHASTIC = ("ddpm", "sa-solver", "lcm", "scm")
# options each solver takes (``solver_options``), with their defaults
SOLVER_OPTIONS: dict[str, dict[str, Any]] = {
    "ddpm": {"timesteps": None, "clip_sample": False, "clip_sample_range": 1.0},
    "lcm": {"original_steps": 50, "timestep_scaling": 10.0},
    "scm": {"max_timestep": 1.57080, "intermediate_timestep": 1.3, "sigma_data": 0.5},
}
DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _draws_noise(solver: str, eta: float) -> bool:
    return solver in STOCHASTIC or (solver == "ddim" and eta > 0)


def _options(solver: str, options: Mapping[str, Any] | None, schedule: Any = None
             ) -> tuple[tuple[str, Any], ...]:
    known = SOLVER_OPTIONS.get(solver, {})
    if solver == "lcm" and isinstance(schedule, FlowSchedule):
        known = {}  # FlowMatchLCMScheduler: the flow Euler grid, x0 = x - σ v
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise ValueError(f"solver {solver!r} takes no options {unknown}; its options: "
                         f"{sorted(known) or 'none'}")
    chosen = {**known, **(options or {})}
    if chosen.get("timesteps") is not None:  # hashable (a static argument of the program)
        chosen["timesteps"] = tuple(int(t) for t in chosen["timesteps"])
    return tuple(sorted(chosen.items()))


def _check(solver: str, num_steps: int, schedule: Any, prediction: str, eta: float,
           variance: str, key: Any, step_noise: Any = None, noise: Any = None) -> None:
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
    if step_noise is not None:
        if not _draws_noise(solver, eta):
            raise ValueError(f"solver {solver!r} draws no noise between steps: step_noise is "
                             f"for the stochastic solvers ({', '.join(STOCHASTIC)}, ddim with eta > 0)")
        want = (num_steps, *noise.shape)
        if tuple(step_noise.shape) != want:
            raise ValueError(f"step_noise must hold one draw per step, shaped (num_steps, "
                             f"*noise.shape) = {want}; got {tuple(step_noise.shape)}")
    elif key is None and _draws_noise(solver, eta):
        raise ValueError(f"solver {solver!r} draws noise: pass key=jax.random.key(...) or "
                         f"step_noise=")


@functools.partial(jax.jit, static_argnames=(
    "model_fn", "solver", "num_steps", "schedule", "prediction", "eta", "variance", "trajectory",
    "options", "cache"))
def _sample(model_fn: Callable[..., Array], noise: Array, args: tuple[Any, ...],
            key: Array | None, step_noise: Array | None, *, solver: str, num_steps: int,
            schedule: DDPMSchedule | FlowSchedule, prediction: str, eta: float, variance: str,
            trajectory: bool, options: tuple[tuple[str, Any], ...], cache: Any = None
            ) -> Any:
    if cache is not None:
        return _sample_cached(model_fn, noise, args, key, step_noise, solver=solver,
                              num_steps=num_steps, schedule=schedule, prediction=prediction,
                              eta=eta, variance=variance, trajectory=trajectory,
                              options=options, cache=cache)
    return _solve(model_fn, noise, args, key, step_noise, solver=solver, num_steps=num_steps,
                  schedule=schedule, prediction=prediction, eta=eta, variance=variance,
                  trajectory=trajectory, options=options)


def _sample_cached(model_fn: Any, noise: Array, args: tuple[Any, ...], key: Array | None,
                   step_noise: Array | None, *, cache: Any, **kw: Any) -> Any:
    """The solver with a step cache's state threaded through its loop; returns (result,
    stats)."""
    from jdit.sampling.cache import CachedModel

    cached = CachedModel(model_fn, cache)
    x = noise.astype(jnp.float32)
    box = solvers.Threaded(cached.init(x, jnp.zeros((x.shape[0],), jnp.float32), *args))

    def stateful(x: Array, t: Array, *a: Any) -> Array:
        out, box.value = cached(box.value, x, t, *a)
        return out

    token = solvers.THREADED.set(box)
    try:
        out = _solve(stateful, noise, args, key, step_noise, **kw)
    finally:
        solvers.THREADED.reset(token)
    return out, box.value


def _solve(model_fn: Callable[..., Array], noise: Array, args: tuple[Any, ...],
           key: Array | None, step_noise: Array | None, *, solver: str, num_steps: int,
           schedule: DDPMSchedule | FlowSchedule, prediction: str, eta: float, variance: str,
           trajectory: bool, options: tuple[tuple[str, Any], ...]
           ) -> Array | tuple[Array, Array]:
    x = noise.astype(jnp.float32)
    draw = None
    if step_noise is not None:
        draw = solvers.given_noise(step_noise)
    elif key is not None:
        draw = solvers.key_noise(key)

    def model(x: Array, t: Array) -> Array:
        out = model_fn(x, t, *args)
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (x.shape[-1], 2 * x.shape[-1]):
            raise ValueError(f"model_fn returned shape {out.shape} for input {x.shape}; expected "
                             f"the input shape with {x.shape[-1]} or {2 * x.shape[-1]} channels")
        return out.astype(jnp.float32)

    if solver == "ddpm":
        out = solvers.ddpm(model, x, schedule, num_steps, prediction, draw, variance,
                           **dict(options))
    elif solver == "ddim":
        out = solvers.ddim(model, x, schedule, num_steps, prediction, draw, eta)
    elif solver == "lcm" and isinstance(schedule, FlowSchedule):
        out = solvers.flow_lcm(model, x, schedule, num_steps, prediction, draw)
    elif solver == "lcm":
        out = solvers.lcm(model, x, schedule, num_steps, prediction, draw, **dict(options))
    elif solver == "scm":
        out = solvers.scm(model, x, schedule, num_steps, prediction, draw, **dict(options))
    elif solver.startswith("dpm++"):
        out = solvers.dpm(model, x, schedule, num_steps, prediction, order=int(solver[5]))
    elif solver == "sa-solver":
        out = solvers.sa_solver(model, x, schedule, num_steps, prediction, draw)
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
    step_noise: Array | None = None,
    solver_options: Mapping[str, Any] | None = None,
    cache: Any = None,
) -> Any:
    """Integrate from ``noise`` (standard normal, NHWC) to a sample, in one jitted program.

    ``model_fn(x, t, *args)`` returns the model's prediction for latents ``x`` at timesteps
    ``t`` (B,) in the model's convention (DDPM 0..999; flow 1000 σ). With a ``DDPMSchedule`` the
    solvers are ``ddpm`` (ancestral; ``variance`` fixed_small | fixed_large | learned_range),
    ``ddim`` (``eta``), ``dpm++1s``/``2m``/``3m``, ``euler`` and ``heun`` (Karras-style VE
    ODE), ``sa-solver`` (SA-Solver, stochastic predictor-corrector, PixArt-Σ's sampler) and
    ``lcm`` (latent consistency models: PixArt-LCM, LCM-LoRA); with a ``FlowSchedule`` the
    flow ODE is integrated by ``euler``, ``heun`` and the ``dpm++`` solvers, ``lcm`` samples a
    flow consistency model (FlowMatchLCMScheduler) and ``scm`` a continuous-time consistency
    model in TrigFlow time (SANA-Sprint). Each
    reproduces its diffusers scheduler at default settings (DDIM and DDPM without clipping).
    A model returning 2C channels (learned sigma) is guided and integrated on its first C
    channels.

    ``solver_options`` (:data:`SOLVER_OPTIONS`, the defaults those of diffusers): ``ddpm``
    ``timesteps`` (a custom descending grid of ``num_steps`` training timesteps, e.g.
    PixArt-DMD's ``(400,)``), ``clip_sample``, ``clip_sample_range``; ``lcm``
    ``original_steps`` (50), ``timestep_scaling`` (10); ``scm`` ``max_timestep`` (1.5708),
    ``intermediate_timestep`` (1.3, used for two steps), ``sigma_data`` (0.5).

    Compiled once per (model_fn, shapes, solver, steps, schedule, prediction): keep passing the
    same ``model_fn`` object and put arrays that change (parameters, text features, guidance
    scale) in ``args``; or call ``sample`` inside your own ``jax.jit``. With
    ``trajectory=True`` it returns ``(x, states)``, the state after every step stacked first.

    Stochastic solvers (``ddpm``, ``sa-solver``, ``lcm``, ``scm``, ``ddim`` with ``eta > 0``) draw step
    i's noise from ``fold_in(key, i)``, or take it from ``step_noise``: (num_steps, *noise.shape)
    standard-normal draws, entry i being the noise drawn at step i (steps that draw none ignore
    theirs), so that a run can be compared with another library given the same draws.

    ``cache`` (:mod:`jdit.sampling.cache`: ``FirstBlockCache``, ``StaticCache``,
    ``GuidanceCache``, ``MeasureChanges``) skips most of the model on steps where it would
    change little; ``model_fn`` must then be a ``Staged`` model (or a
    ``ClassifierFreeGuidance`` of one). The call returns ``(result, stats)``: ``stats``
    counts model calls (``call``), blocks run (``blocks``, of ``call × depth``) and calls that
    skipped (``skipped``).
    """
    _check(solver, num_steps, schedule, prediction, eta, variance, key, step_noise, noise)
    options = _options(solver, solver_options, schedule)
    grid = dict(options).get("timesteps")
    if grid is not None:  # a custom grid: descending training timesteps, one per step
        n = schedule.num_train_timesteps
        if len(grid) != num_steps or any(not 0 <= t < n for t in grid) or any(
                a <= b for a, b in zip(grid, grid[1:], strict=False)):
            raise ValueError(f"timesteps must be {num_steps} (num_steps) descending integers in "
                             f"[0, {n}), got {list(grid)}")
    if solver == "lcm" and isinstance(schedule, DDPMSchedule):  # the step count its grid gives
        tables.lcm_timesteps(schedule.num_train_timesteps, num_steps, dict(options)["original_steps"])
    if solver == "scm":
        o = dict(options)
        solvers.scm_timesteps(num_steps, o["max_timestep"], o["intermediate_timestep"])
    return _sample(model_fn, noise, tuple(args), None if step_noise is not None else key,
                   step_noise, solver=solver, num_steps=num_steps, schedule=schedule,
                   prediction=prediction, eta=float(eta), variance=variance,
                   trajectory=trajectory, options=options, cache=cache)

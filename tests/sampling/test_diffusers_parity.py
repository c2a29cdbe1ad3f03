"""Every solver's trajectory against its diffusers scheduler, same schedule and step count.

Both sides are driven by the same deterministic nonlinear model function, written once in jnp
(NHWC) and once in torch (NCHW); stochastic solvers get the same noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    SASolverScheduler,
    SCMScheduler,
)
from diffusers.schedulers import (
    scheduling_ddpm,
    scheduling_flow_match_lcm,
    scheduling_lcm,
    scheduling_sasolver,
    scheduling_scm,
)

import jdit
from jdit.diffusion import DDPMSchedule, FlowSchedule

TOL = 1e-5
C = 3
MIX = np.random.default_rng(7).standard_normal((C, C)).astype(np.float32) * 0.8
SHAPE = (2, 6, 5, C)
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample",
                        "flow": "flow_prediction"}


def jnp_model(x, t, learned_sigma=False, x0_prediction=False):
    s = (t / 1000.0)[:, None, None, None]
    h = jnp.einsum("bhwc,cd->bhwd", x, jnp.asarray(MIX))
    out = jnp.tanh(h) * (0.5 + s) + 0.2 * jnp.sin(3.0 * s) * x
    if x0_prediction:  # a plausible denoiser: x0 -> x as t -> 0
        out = x + s * out
    if learned_sigma:
        out = jnp.concatenate([out, 0.9 * jnp.tanh(0.7 * x + s)], axis=-1)
    return out


def torch_model(x, t, learned_sigma=False, x0_prediction=False):
    s = (t.float() / 1000.0)[:, None, None, None]
    h = torch.einsum("bchw,cd->bdhw", x, torch.from_numpy(MIX))
    out = torch.tanh(h) * (0.5 + s) + 0.2 * torch.sin(3.0 * s) * x
    if x0_prediction:
        out = x + s * out
    if learned_sigma:
        out = torch.cat([out, 0.9 * torch.tanh(0.7 * x + s)], dim=1)
    return out


def start_noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def run_diffusers(scheduler, steps, learned_sigma=False, step_kwargs=None, set_kwargs=None):
    scheduler.set_timesteps(steps, **(set_kwargs or {}))  # steps None: the sigmas given
    x = to_torch(start_noise()) * getattr(scheduler, "init_noise_sigma", 1.0)
    x0_prediction = getattr(scheduler.config, "prediction_type", None) in ("sample", "original_sample")
    path = []
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = torch_model(x_in, t.expand(SHAPE[0]), learned_sigma, x0_prediction)
        kwargs = step_kwargs(i) if step_kwargs else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        path.append(x.permute(0, 2, 3, 1).numpy())
    return path


def run_jdit(solver, steps, schedule, prediction, learned_sigma=False, **kw):
    model = jax.tree_util.Partial(jnp_model, learned_sigma=learned_sigma,
                                  x0_prediction=prediction == "sample")
    x, path = jdit.sampling.sample(model, jnp.asarray(start_noise()), solver=solver,
                                   num_steps=steps, schedule=schedule, prediction=prediction,
                                   trajectory=True, **kw)
    return np.asarray(x), np.asarray(path)


def assert_same_path(ours, theirs, final):
    ours_path = [p for p in ours[1]]
    if len(theirs) != len(ours_path):  # Heun: diffusers reports both half steps
        theirs = theirs[1::2] + [theirs[-1]] if len(theirs) == 2 * len(ours_path) - 1 else theirs
    assert len(theirs) == len(ours_path)
    for i, (a, b) in enumerate(zip(ours_path, theirs, strict=True)):
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= TOL, f"step {i}: relative error {err:.2e}"
    np.testing.assert_array_equal(ours[0], ours_path[-1])
    assert final is None or np.max(np.abs(ours[0] - final)) / np.max(np.abs(final)) <= TOL


SCHEDULES = {
    "linear": (DDPMSchedule.linear(), dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
    "scaled_linear": (DDPMSchedule.scaled_linear(),
                      dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    "squaredcos_cap_v2": (DDPMSchedule.squaredcos_cap_v2(), dict(beta_schedule="squaredcos_cap_v2")),
}


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("order,steps", [(1, 10), (2, 10), (2, 25), (3, 12), (3, 25)])
def test_dpm_solver_pp_vp(prediction, order, steps):
    sched, cfg = SCHEDULES["linear"]
    ref = run_diffusers(DPMSolverMultistepScheduler(
        solver_order=order, prediction_type=DIFFUSERS_PREDICTION[prediction], **cfg), steps)
    assert_same_path(run_jdit(f"dpm++{order}{'s' if order == 1 else 'm'}", steps, sched,
                              prediction), ref, ref[-1])


@pytest.mark.parametrize("name", ["scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("solver", ["dpm++2m", "euler", "heun", "ddim"])
def test_other_beta_schedules(name, solver):
    sched, cfg = SCHEDULES[name]
    make = {"dpm++2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
            "heun": HeunDiscreteScheduler,
            "ddim": lambda **c: DDIMScheduler(clip_sample=False, **c)}[solver]
    ref = run_diffusers(make(**cfg), 15)
    assert_same_path(run_jdit(solver, 15, sched, "epsilon"), ref, ref[-1])


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("solver,make", [
    ("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler)])
def test_karras_style_vp(prediction, solver, make):
    sched, cfg = SCHEDULES["linear"]
    name = DIFFUSERS_PREDICTION[prediction]
    if solver == "euler" and prediction == "sample":
        name = "original_sample"  # EulerDiscreteScheduler's name for x0-prediction
    ref = run_diffusers(make(prediction_type=name, **cfg), 12)
    assert_same_path(run_jdit(solver, 12, sched, prediction), ref, ref[-1])


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim(prediction, eta):
    sched, cfg = SCHEDULES["linear"]
    key = jax.random.key(3)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE)) for i in range(20)]
    ref = run_diffusers(DDIMScheduler(clip_sample=False,
                                      prediction_type=DIFFUSERS_PREDICTION[prediction], **cfg), 20,
                        step_kwargs=lambda i: dict(eta=eta, variance_noise=to_torch(noises[i])))
    assert_same_path(run_jdit("ddim", 20, sched, prediction, eta=eta, key=key), ref, ref[-1])


@pytest.mark.parametrize("prediction,variance,learned", [
    ("epsilon", "fixed_small", False), ("v", "fixed_small", False),
    ("epsilon", "fixed_large", False), ("epsilon", "learned_range", True)])
def test_ddpm_ancestral(monkeypatch, prediction, variance, learned):
    sched, cfg = SCHEDULES["linear"]
    key = jax.random.key(11)
    steps = 25
    noises = iter([to_torch(jax.random.normal(jax.random.fold_in(key, i), SHAPE))
                   for i in range(steps)])
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(noises))
    ref = run_diffusers(DDPMScheduler(clip_sample=False, variance_type=variance,
                                      prediction_type=DIFFUSERS_PREDICTION[prediction], **cfg),
                        steps, learned_sigma=learned)
    ours = run_jdit("ddpm", steps, sched, prediction, learned_sigma=learned, key=key,
                    variance=variance)
    assert_same_path(ours, ref, ref[-1])


@pytest.mark.parametrize("timesteps,clip", [((400,), False), ((400,), True),
                                            ((999, 700, 350, 20), False), ((800, 300), True)])
def test_ddpm_on_a_custom_grid_with_clipping(monkeypatch, timesteps, clip):
    """PixArt-DMD's one step at t = 400 (DDPMScheduler with timesteps=[400]), other custom grids,
    and the clean estimate clipped as DDPMScheduler does by default."""
    sched, cfg = SCHEDULES["linear"]
    steps = len(timesteps)
    draws = np.random.default_rng(9).standard_normal((steps, *SHAPE)).astype(np.float32)
    noises = iter([to_torch(d) for d in draws])
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(noises))
    ref = run_diffusers(DDPMScheduler(clip_sample=clip, clip_sample_range=1.5, **cfg), None,
                        set_kwargs=dict(timesteps=list(timesteps)))
    ours = run_jdit("ddpm", steps, sched, "epsilon", step_noise=jnp.asarray(draws),
                    solver_options=dict(timesteps=timesteps, clip_sample=clip,
                                        clip_sample_range=1.5))
    assert_same_path(ours, ref, ref[-1])


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("solver,make", [
    ("euler", lambda s: FlowMatchEulerDiscreteScheduler(shift=s)),
    ("heun", lambda s: FlowMatchHeunDiscreteScheduler(shift=s)),
    ("dpm++1s", lambda s: DPMSolverMultistepScheduler(
        solver_order=1, use_flow_sigmas=True, flow_shift=s, prediction_type="flow_prediction")),
    ("dpm++2m", lambda s: DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=s, prediction_type="flow_prediction")),
    ("dpm++3m", lambda s: DPMSolverMultistepScheduler(
        solver_order=3, use_flow_sigmas=True, flow_shift=s, prediction_type="flow_prediction")),
])
@pytest.mark.parametrize("steps", [8, 20])
def test_flow(solver, make, shift, steps):
    ref = run_diffusers(make(shift), steps)
    assert_same_path(run_jdit(solver, steps, FlowSchedule(shift), "flow"), ref, ref[-1])


def test_flow_dynamic_shift_from_token_count():
    num_tokens = 1024
    flow = FlowSchedule.dynamic_from_tokens(num_tokens)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (num_tokens - 256)
    ref = run_diffusers(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10,
                        set_kwargs=dict(mu=mu))
    assert_same_path(run_jdit("euler", 10, flow, "flow"), ref, ref[-1])


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [4, 12, 25])
def test_sa_solver(monkeypatch, prediction, steps):
    """PixArt-Σ's SA-Solver: predictor 2, corrector 2, τ = 1 for 200 <= t <= 800."""
    sched, cfg = SCHEDULES["linear"]
    key = jax.random.key(5)
    noises = iter([to_torch(jax.random.normal(jax.random.fold_in(key, i), SHAPE))
                   for i in range(steps)])
    monkeypatch.setattr(scheduling_sasolver, "randn_tensor", lambda *a, **k: next(noises))
    ref = run_diffusers(SASolverScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction], **cfg),
                        steps)
    assert_same_path(run_jdit("sa-solver", steps, sched, prediction, key=key), ref, ref[-1])


@pytest.mark.parametrize("name,prediction,steps,original", [
    ("linear", "epsilon", 1, 50), ("linear", "epsilon", 4, 50), ("scaled_linear", "epsilon", 2, 50),
    ("scaled_linear", "v", 8, 50), ("linear", "epsilon", 3, 20), ("linear", "sample", 4, 50)])
def test_lcm_with_the_same_draws(monkeypatch, name, prediction, steps, original):
    """PixArt-LCM's (and LCM-LoRA's) scheduler: the consistency boundary condition at each
    grid timestep and fresh noise between steps, here handed to both as step_noise."""
    sched, cfg = SCHEDULES[name]
    draws = np.random.default_rng(3).standard_normal((steps, *SHAPE)).astype(np.float32)
    noises = iter([to_torch(d) for d in draws])
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: next(noises))
    ref = run_diffusers(LCMScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction],
                                     original_inference_steps=original, **cfg), steps)
    options = {"original_steps": original} if original != 50 else None
    ours = run_jdit("lcm", steps, sched, prediction, step_noise=jnp.asarray(draws),
                    solver_options=options)
    assert_same_path(ours, ref, ref[-1])


@pytest.mark.parametrize("steps,options,set_kwargs", [
    (1, None, dict(intermediate_timesteps=None)), (2, None, {}),
    (2, {"intermediate_timestep": 1.1, "max_timestep": 1.5}, dict(intermediate_timesteps=1.1,
                                                                   max_timesteps=1.5)),
    (4, None, dict(intermediate_timesteps=None))])
def test_scm_with_the_same_draws(monkeypatch, steps, options, set_kwargs):
    """SANA-Sprint's sampler: SCMScheduler in TrigFlow time around a flow-velocity model, the
    conversions as SanaSprintPipeline makes them (written out here in torch)."""
    sigma_data = 0.5
    draws = np.random.default_rng(5).standard_normal((steps, *SHAPE)).astype(np.float32)
    noises = iter([to_torch(d) for d in draws])
    monkeypatch.setattr(scheduling_scm, "randn_tensor", lambda *a, **k: next(noises))
    scheduler = SCMScheduler()
    scheduler.set_timesteps(steps, **set_kwargs)
    scheduler.set_begin_index(0)
    x = to_torch(start_noise()) * sigma_data
    path = []
    for t in scheduler.timesteps[:-1]:
        tb = t.expand(SHAPE[0])
        s = (torch.sin(tb) / (torch.cos(tb) + torch.sin(tb))).view(-1, 1, 1, 1)
        x_in = x / sigma_data * torch.sqrt(s**2 + (1 - s) ** 2)
        v = torch_model(x_in, 1000 * s.flatten())
        f = ((1 - 2 * s) * x_in + (1 - 2 * s + 2 * s**2) * v) / torch.sqrt(s**2 + (1 - s) ** 2)
        x, denoised = scheduler.step(f * sigma_data, tb, x, return_dict=False)
        path.append((x / sigma_data).permute(0, 2, 3, 1).numpy())
    final = (denoised / sigma_data).permute(0, 2, 3, 1).numpy()
    ours = run_jdit("scm", steps, FlowSchedule(1.0), "flow", step_noise=jnp.asarray(draws),
                    solver_options=options)
    assert_same_path(ours, path, final)


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (4, 3.0), (8, 1.0)])
def test_flow_lcm_with_the_same_draws(monkeypatch, steps, shift):
    """A flow model's consistency sampling (FlowMatchLCMScheduler): x0 = x - σ v, re-noised."""
    draws = np.random.default_rng(6).standard_normal((steps, *SHAPE)).astype(np.float32)
    noises = iter([to_torch(d) for d in draws])
    monkeypatch.setattr(scheduling_flow_match_lcm, "randn_tensor", lambda *a, **k: next(noises))
    ref = run_diffusers(FlowMatchLCMScheduler(shift=shift), steps)
    ours = run_jdit("lcm", steps, FlowSchedule(shift), "flow", step_noise=jnp.asarray(draws))
    assert_same_path(ours, ref, ref[-1])


def test_step_noise_is_what_the_key_would_draw_and_changes_the_result():
    """Entry i of step_noise is step i's draw: the draws of fold_in(key, i) given as step_noise
    reproduce the key's run; other draws give another sample. Solvers without noise refuse."""
    sched, _ = SCHEDULES["linear"]
    key = jax.random.key(4)
    for solver, steps in (("ddpm", 6), ("lcm", 4), ("sa-solver", 5)):
        draws = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), SHAPE)
                           for i in range(steps)])
        by_key = run_jdit(solver, steps, sched, "epsilon", key=key)[0]
        given = run_jdit(solver, steps, sched, "epsilon", step_noise=draws)[0]
        np.testing.assert_allclose(given, by_key, rtol=2e-6, atol=1e-6)  # float32 rounding
        other = run_jdit(solver, steps, sched, "epsilon", step_noise=-draws)[0]
        assert np.max(np.abs(other - by_key)) > 1e-2, solver
    with pytest.raises(ValueError, match="draws no noise"):
        run_jdit("dpm++2m", 4, sched, "epsilon", step_noise=draws[:4])
    with pytest.raises(ValueError, match=r"\(num_steps, \*noise.shape\)"):
        run_jdit("lcm", 4, sched, "epsilon", step_noise=draws[:3])
    with pytest.raises(ValueError, match="1 to original_steps=50"):
        run_jdit("lcm", 60, sched, "epsilon", key=key)
    with pytest.raises(ValueError, match="takes no options"):
        run_jdit("lcm", 4, sched, "epsilon", key=key, solver_options={"shift": 2})
    with pytest.raises(ValueError, match="descending integers"):
        run_jdit("ddpm", 2, sched, "epsilon", key=key, solver_options={"timesteps": (100, 400)})
    # scm runs its own TrigFlow grid: a schedule's shift does not change it
    np.testing.assert_array_equal(run_jdit("scm", 2, FlowSchedule(3.0), "flow", key=key)[0],
                                  run_jdit("scm", 2, FlowSchedule(1.0), "flow", key=key)[0])
    with pytest.raises(ValueError, match="max_timestep"):
        run_jdit("scm", 2, FlowSchedule(1.0), "flow", key=key, solver_options={"max_timestep": 2})


@pytest.mark.parametrize("steps", [6, 30])
def test_flow_with_a_pipelines_linspace_sigmas(steps):
    """Lumina-Image 2.0's (and Flux's) pipelines pass σ = linspace(1, 1/N, N) to a statically
    shifted FlowMatchEulerDiscreteScheduler: ``FlowSchedule(grid="linspace")``."""
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    ref = run_diffusers(FlowMatchEulerDiscreteScheduler(shift=6.0), None,
                        set_kwargs=dict(sigmas=sigmas))
    ours = run_jdit("euler", steps, FlowSchedule(6.0, grid="linspace"), "flow")
    assert_same_path(ours, ref, ref[-1])
    with pytest.raises(ValueError, match="euler or heun"):
        run_jdit("dpm++2m", steps, FlowSchedule(6.0, grid="linspace"), "flow")

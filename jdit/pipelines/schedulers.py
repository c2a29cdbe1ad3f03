"""A diffusers ``scheduler_config.json`` as a jdit sampler: solver name, schedule, prediction.

jdit's solvers reproduce their diffusers schedulers at those schedulers' default settings
(``tests/sampling/test_diffusers_parity.py``). A pipeline folder's scheduler is therefore read
as (class → solver, betas or flow shift → schedule, prediction type) and every other field must
hold the value the solver reproduces; a field set otherwise (Karras sigmas, thresholding, ...)
is an error naming it rather than a silently different sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jdit.diffusion import DDPMSchedule, FlowSchedule

PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample",
               "flow_prediction": "flow"}

# Fields every discrete (VP) scheduler must leave at these values.
_VP_FIXED = {"thresholding": False, "rescale_betas_zero_snr": False, "steps_offset": 0,
             "use_karras_sigmas": False, "use_exponential_sigmas": False,
             "use_beta_sigmas": False}
# class name -> (solver, schedule kind, fields that must hold these values)
_CLASSES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "DPMSolverMultistepScheduler": ("dpm++", "vp|flow", {
        **_VP_FIXED, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "use_lu_lambdas": False,
        "final_sigmas_type": "zero", "timestep_spacing": "linspace"}),
    "DDIMScheduler": ("ddim", "vp", {**_VP_FIXED, "clip_sample": False, "set_alpha_to_one": True,
                                     "timestep_spacing": "leading"}),
    "DDPMScheduler": ("ddpm", "vp", {**_VP_FIXED, "timestep_spacing": "leading"}),
    "EulerDiscreteScheduler": ("euler", "vp", {**_VP_FIXED, "timestep_spacing": "linspace",
                                               "interpolation_type": "linear",
                                               "final_sigmas_type": "zero"}),
    "HeunDiscreteScheduler": ("heun", "vp", {**_VP_FIXED, "timestep_spacing": "linspace"}),
    "SASolverScheduler": ("sa-solver", "vp", {**_VP_FIXED, "predictor_order": 2,
                                              "corrector_order": 2, "tau_func": None,
                                              "algorithm_type": "data_prediction",
                                              "lower_order_final": True,
                                              "timestep_spacing": "linspace"}),
    "FlowMatchEulerDiscreteScheduler": ("euler", "flow", {
        "use_dynamic_shifting": False, "use_karras_sigmas": False, "invert_sigmas": False,
        "shift_terminal": None, "stochastic_sampling": False, "time_shift_type": "exponential"}),
    "FlowMatchHeunDiscreteScheduler": ("heun", "flow", {}),
    "FlowMatchLCMScheduler": ("lcm", "flow", {
        "use_dynamic_shifting": False, "use_karras_sigmas": False, "invert_sigmas": False,
        "shift_terminal": None, "time_shift_type": "exponential", "scale_factors": None}),
    "LCMScheduler": ("lcm", "vp", {**_VP_FIXED, "clip_sample": False}),
    # SANA-Sprint: TrigFlow consistency sampling of a flow-velocity model (the pipeline converts)
    "SCMScheduler": ("scm", "flow", {"prediction_type": "trigflow"}),
}
# class name -> {config field: solver option} (jdit.sampling.sample's solver_options)
_OPTIONS = {"LCMScheduler": {"original_inference_steps": "original_steps",
                             "timestep_scaling": "timestep_scaling"},
            "SCMScheduler": {"sigma_data": "sigma_data"},
            "DDPMScheduler": {"clip_sample": "clip_sample",
                              "clip_sample_range": "clip_sample_range"}}
# Defaults diffusers applies to fields a config leaves out (only those that need it).
_DEFAULTS = {"DDIMScheduler": {"clip_sample": True}, "DDPMScheduler": {"clip_sample": True,
                                                                     "variance_type": "fixed_small"}}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """What :func:`jdit.sampling.sample` needs besides the model: ``sample(fn, noise,
    solver=spec.solver, schedule=spec.schedule, prediction=spec.prediction, variance=...)``."""

    solver: str
    schedule: DDPMSchedule | FlowSchedule
    prediction: str
    variance: str = "fixed_small"
    options: tuple[tuple[str, Any], ...] = ()  # the solver's options, as (name, value) pairs


def _betas(cfg: Mapping[str, Any]) -> DDPMSchedule:
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return DDPMSchedule(tuple(float(b) for b in cfg["trained_betas"]))
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return DDPMSchedule.linear(n, start, end)
    if kind == "scaled_linear":
        return DDPMSchedule.scaled_linear(n, start, end)
    if kind == "squaredcos_cap_v2":
        return DDPMSchedule.squaredcos_cap_v2(n)
    raise ValueError(f"scheduler beta_schedule {kind!r} is not supported; expected linear, "
                     f"scaled_linear or squaredcos_cap_v2")


def from_diffusers_config(cfg: Mapping[str, Any]) -> SamplerSpec:
    """The sampler a diffusers scheduler config describes (``_class_name`` picks the solver)."""
    name = cfg.get("_class_name")
    if name not in _CLASSES:
        raise ValueError(f"scheduler {name!r} has no jdit solver; supported: {sorted(_CLASSES)}. "
                         f"Pass solver=... to pick one of jdit's solvers instead")
    solver, kinds, fixed = _CLASSES[name]
    values = {**_DEFAULTS.get(name, {}), **cfg}
    wrong = {k: values[k] for k, want in fixed.items() if k in values and values[k] != want}
    if wrong:
        raise ValueError(f"{name} with {wrong} differs from what jdit's {solver!r} solver "
                         f"reproduces ({ {k: fixed[k] for k in wrong} }); pass solver=... to "
                         f"sample with a jdit solver instead")
    prediction = ("flow" if name == "SCMScheduler"
                  else PREDICTIONS.get(cfg.get("prediction_type", "epsilon")))
    if prediction is None:
        raise ValueError(f"scheduler prediction_type {cfg.get('prediction_type')!r} is not "
                         f"supported; expected one of {sorted(PREDICTIONS)}")
    flow = "flow" in kinds and (kinds == "flow" or bool(cfg.get("use_flow_sigmas")))
    if flow:
        shift = float(cfg.get("shift", cfg.get("flow_shift", 1.0)))
        schedule: DDPMSchedule | FlowSchedule = FlowSchedule(
            shift, int(cfg.get("num_train_timesteps", 1000)))
        prediction = "flow"
    else:
        schedule = _betas(cfg)
    if solver == "dpm++":
        order = int(cfg.get("solver_order", 2))
        solver = {1: "dpm++1s", 2: "dpm++2m", 3: "dpm++3m"}.get(order, "")
        if not solver:
            raise ValueError(f"DPMSolverMultistepScheduler solver_order {order}: expected 1-3")
    variance = values.get("variance_type") or "fixed_small"
    if solver == "ddpm" and variance not in ("fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"DDPMScheduler variance_type {variance!r} is not supported")
    options = tuple(sorted((option, values[field]) for field, option in
                           _OPTIONS.get(name, {}).items() if values.get(field) is not None))
    return SamplerSpec(solver, schedule, prediction,
                       variance if solver == "ddpm" else "fixed_small", options)

"""Static sampling grids: the timesteps and σ of each solver, as its diffusers scheduler makes them.

Everything here is numpy at trace time; the compiled loop only sees the resulting constants.
Each function names the diffusers scheduler (default settings) whose discretisation it follows.
"""

from __future__ import annotations

import numpy as np

from jdit.diffusion.schedules import DDPMSchedule, FlowSchedule


def leading_timesteps(num_train: int, num_steps: int, offset: int = 0) -> np.ndarray:
    """``timestep_spacing="leading"`` (DDPMScheduler, DDIMScheduler): 0, k, 2k, ... reversed."""
    ratio = num_train // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + offset


def lcm_timesteps(num_train: int, num_steps: int, original_steps: int = 50) -> np.ndarray:
    """LCMScheduler's grid: ``num_steps`` evenly spaced picks (by index, descending) of the
    distillation grid ``k - 1, 2k - 1, ..., num_train - 1`` with ``k = num_train //
    original_steps``."""
    if not 1 <= original_steps <= num_train:
        raise ValueError(f"original_steps must be in [1, {num_train}], got {original_steps}")
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"LCM samples with 1 to original_steps={original_steps} steps (a subset "
                         f"of its distillation grid), got num_steps={num_steps}")
    k = num_train // original_steps
    grid = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)
    return grid[picks].astype(np.int64)


def _interp_sigmas(schedule: DDPMSchedule, timesteps: np.ndarray) -> np.ndarray:
    k = schedule.karras_sigmas
    return np.interp(timesteps, np.arange(len(k)), k)


def dpm_vp(schedule: DDPMSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistepScheduler: integer timesteps (linspace spacing) and VE σ, final σ = 0."""
    t = np.linspace(0, schedule.num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    t = t.astype(np.int64)
    sigmas = np.concatenate([_interp_sigmas(schedule, t), [0.0]]).astype(np.float32)
    return t, sigmas


def dpm_flow(flow: FlowSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).

    The model receives ``int(1000 σ)``: diffusers stores these timesteps as int64.
    """
    n_train = flow.num_train_timesteps
    alphas = np.linspace(1, 1 / n_train, num_steps + 1)
    sigmas = np.flip(flow.shift_sigma(1.0 - alphas))[:-1].copy()
    t = (sigmas * n_train).astype(np.int64)
    return t, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def karras_vp(schedule: DDPMSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
    """EulerDiscreteScheduler / HeunDiscreteScheduler: float timesteps (linspace), VE σ.

    Returns ``(timesteps, sigmas with a final 0, init_noise_sigma)``.
    """
    t = np.linspace(0, schedule.num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()
    sigmas = np.concatenate([_interp_sigmas(schedule, t), [0.0]]).astype(np.float32)
    return t, sigmas, float(sigmas.max())


def flow_match(flow: FlowSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler: ``(1000 σ, σ + [0])``.

    The grid runs from the largest to the smallest *training* σ, then is shifted; with a static
    shift the smallest training σ is already shifted, so it is shifted twice (a diffusers quirk
    kept for parity). ``grid="linspace"``: the pipeline's σ = linspace(1, 1/N, N), shifted.
    """
    n_train = flow.num_train_timesteps
    if flow.grid == "linspace":  # a pipeline's sigmas, cast to float32 and shifted as diffusers
        sigmas = flow.shift_sigma(np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32))
        sigmas = sigmas.astype(np.float32)
        return sigmas * np.float32(n_train), np.concatenate([sigmas, [0.0]]).astype(np.float32)
    train = (np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / n_train).astype(np.float32)
    if not flow.dynamic:
        train = flow.shift_sigma(train).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    t = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps)
    sigmas = flow.shift_sigma(t / n_train).astype(np.float32)
    return sigmas * np.float32(n_train), np.concatenate([sigmas, [0.0]]).astype(np.float32)

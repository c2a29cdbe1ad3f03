"""Noise schedules, training objectives and timestep samplers."""

from jdit.diffusion.objectives import (
    diffusion_loss,
    flow_loss,
    learned_sigma_loss,
    learned_sigma_vb,
    loss_weight,
    prediction_target,
)
from jdit.diffusion.schedules import DDPMSchedule, FlowSchedule, Schedule, make_schedule
from jdit.diffusion.timesteps import sample_ddpm_timesteps, sample_flow_sigmas

__all__ = [
    "DDPMSchedule", "FlowSchedule", "Schedule", "diffusion_loss", "flow_loss",
    "learned_sigma_loss", "learned_sigma_vb", "loss_weight", "make_schedule", "prediction_target",
    "sample_ddpm_timesteps", "sample_flow_sigmas",
]

"""Noise schedules and training objectives."""

from jdit.diffusion.schedules import DDPMSchedule, FlowSchedule, Schedule

__all__ = ["DDPMSchedule", "FlowSchedule", "Schedule"]

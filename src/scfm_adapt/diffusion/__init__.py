"""Noise schedules and samplers: parameter-free, independent of the denoiser."""

from ._samplers import ddim_invert, ddim_sample, ddpm_sample, timesteps
from ._schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "ddim_invert", "ddim_sample", "ddpm_sample", "timesteps"]

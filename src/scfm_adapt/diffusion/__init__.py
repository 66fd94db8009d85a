"""Noise schedules and samplers: parameter-free, independent of the denoiser."""

from ._samplers import ddim_sample, ddpm_sample
from ._schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "ddim_sample", "ddpm_sample"]

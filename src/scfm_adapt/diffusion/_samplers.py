"""Ancestral (DDPM) and deterministic (DDIM) samplers over any denoiser callable.

``denoise(x_t, t) -> out`` is the denoiser's output in the schedule's parametrisation
(classifier-free guidance is applied inside that callable by the caller).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _timesteps(schedule: NoiseSchedule, n_steps: int) -> list[int]:
    n_steps = max(1, min(n_steps, schedule.n_steps))
    ts = torch.linspace(schedule.n_steps - 1, 0, n_steps).round().long().unique_consecutive()
    return ts.tolist()


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    n_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al., 2021): deterministic for ``eta=0``, DDPM-like for ``eta=1``."""
    ab_all = schedule.alpha_bar(x_T.device)
    ts = _timesteps(schedule, n_steps)
    x = x_T
    it = ts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(ts, desc="sampling", leave=False)
    for i, t in enumerate(it):
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = schedule.split(x, t_vec, denoise(x, t_vec))
        ab_prev = ab_all[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=ab_all.dtype)
        ab_t = ab_all[t]
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
        dir_coef = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
        x = ab_prev.sqrt().to(x.dtype) * x0 + dir_coef.to(x.dtype) * eps
        if eta > 0 and i + 1 < len(ts):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + sigma.to(x.dtype) * noise
    return x


def ddpm_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    n_steps: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling; with fewer steps than the schedule it is DDIM with ``eta=1``."""
    return ddim_sample(
        denoise, schedule, x_T, n_steps or schedule.n_steps, 1.0, generator, progress
    )

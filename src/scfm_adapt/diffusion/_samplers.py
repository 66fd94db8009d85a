"""Ancestral (DDPM) and deterministic (DDIM) samplers over any denoiser callable, and
DDIM inversion.

``denoise(x_t, t) -> out`` is the denoiser's output in the schedule's parametrisation
(classifier-free guidance is applied inside that callable by the caller).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timesteps(schedule: NoiseSchedule, n_steps: int, strength: float = 1.0) -> list[int]:
    """The decreasing time steps a sampler visits: ``n_steps`` of them, evenly spaced from
    ``strength * (T - 1)`` down to 0."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength}; use a value in (0, 1].")
    t_max = round(strength * (schedule.n_steps - 1))
    n_steps = max(1, min(n_steps, t_max + 1))
    ts = torch.linspace(t_max, 0, n_steps).round().long().unique_consecutive()
    return ts.tolist()


def _progress(ts: list[int], progress: bool, desc: str):
    if not progress:
        return ts
    from tqdm.auto import tqdm

    return tqdm(ts, desc=desc, leave=False)


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    n_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    strength: float = 1.0,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """DDIM (Song et al., 2021): deterministic for ``eta=0``, DDPM-like for ``eta=1``.

    ``x_T`` is at time ``strength * (T - 1)``: pure noise for ``strength=1``, a partly
    noised (or inverted) latent otherwise. ``clip_x0`` clamps each predicted clean sample
    to ``[-clip_x0, clip_x0]`` (and re-derives the noise from it), as DDPM does for images:
    at the first steps of a cosine schedule ``sqrt(alpha_bar)`` is ~1e-5 and an
    eps-prediction's error would otherwise be amplified 10^4-fold.
    """
    ab_all = schedule.alpha_bar(x_T.device)
    ts = timesteps(schedule, n_steps, strength)
    x = x_T
    for i, t in enumerate(_progress(ts, progress, "sampling")):
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = schedule.split(x, t_vec, denoise(x, t_vec))
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            a, s = schedule._coefs(t_vec, x)
            eps = (x - a * x0) / s
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
    strength: float = 1.0,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Ancestral sampling; with fewer steps than the schedule it is DDIM with ``eta=1``."""
    n_steps = n_steps or schedule.n_steps
    return ddim_sample(denoise, schedule, x_T, n_steps, 1.0, generator, progress, strength, clip_x0)


@torch.no_grad()
def ddim_invert(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x_0: torch.Tensor,
    n_steps: int = 50,
    progress: bool = False,
    strength: float = 1.0,
) -> torch.Tensor:
    """Deterministic DDIM inversion: run the ``eta=0`` ODE from clean tokens ``x_0`` up to
    time ``strength * (T - 1)``.

    :func:`ddim_sample` with the same ``n_steps``, ``strength`` and denoiser (``eta=0``)
    maps the result back to ``x_0`` up to the discretisation error (each step uses the
    denoiser at the point it starts from); sampling it under another condition gives the
    counterfactual of ``x_0``.
    """
    ab_all = schedule.alpha_bar(x_0.device)
    ts = timesteps(schedule, n_steps, strength)[::-1]  # increasing
    x = x_0
    ab_cur = torch.ones((), dtype=ab_all.dtype, device=x_0.device)
    t_cur = 0
    for t in _progress(ts, progress, "inverting"):
        t_vec = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.long)
        out = denoise(x, t_vec)
        a, s = ab_cur.sqrt().to(x.dtype), (1 - ab_cur).sqrt().to(x.dtype)
        if schedule.prediction == "eps":
            eps = out
        else:  # v-prediction at the current point
            eps = s * x + a * out
        x0 = (x - s * eps) / a
        ab_t = ab_all[t]
        x = ab_t.sqrt().to(x.dtype) * x0 + (1 - ab_t).sqrt().to(x.dtype) * eps
        ab_cur, t_cur = ab_t, t
    return x

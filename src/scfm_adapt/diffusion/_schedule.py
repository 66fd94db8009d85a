"""A discrete-time Gaussian diffusion with a cosine schedule (Nichol & Dhariwal, 2021).

Parameter-free: nothing here is learned or saved, so a checkpoint only needs the name and
size of the schedule to rebuild it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """Forward process ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps``.

    Parameters
    ----------
    n_steps
        Number of discrete diffusion steps ``T``.
    kind
        ``"cosine"`` or ``"linear"`` (DDPM's betas from 1e-4 to 0.02, rescaled when
        ``n_steps != 1000``).
    prediction
        What the denoiser predicts: ``"eps"`` (the noise) or ``"v"`` (velocity).
    """

    n_steps: int = 1000
    kind: str = "cosine"
    prediction: str = "eps"

    def __post_init__(self):
        if self.kind not in ("cosine", "linear"):
            raise ValueError(f"Unknown schedule kind {self.kind!r}; use 'cosine' or 'linear'.")
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"Unknown prediction {self.prediction!r}; use 'eps' or 'v'.")

    def alpha_bar(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Cumulative signal fraction ``ab_t`` for ``t = 0..T-1``, float64, shape ``(T,)``."""
        steps = torch.arange(self.n_steps + 1, dtype=torch.float64, device=device)
        if self.kind == "cosine":
            s = 0.008
            f = torch.cos((steps / self.n_steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            scale = 1000 / self.n_steps  # keeps the end point of DDPM's 1000-step schedule
            betas = torch.linspace(
                scale * 1e-4,
                min(scale * 0.02, 0.999),
                self.n_steps,
                dtype=torch.float64,
                device=device,
            )
        return torch.cumprod(1 - betas, dim=0)

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar(t.device)[t.long()].to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return ab.sqrt().view(shape), (1 - ab).sqrt().view(shape)

    def sample_t(self, n: int, device=None, generator: torch.Generator | None = None):
        """Uniform random time steps, shape ``(n,)``."""
        return torch.randint(0, self.n_steps, (n,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean tokens ``x0`` to time ``t``."""
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the denoiser should output for ``(x_t, t)``."""
        if self.prediction == "eps":
            return noise
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def split(
        self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a denoiser output into ``(x0_hat, eps_hat)``."""
        a, s = self._coefs(t, x_t)
        if self.prediction == "eps":
            eps = out
            x0 = (x_t - s * eps) / a
        else:
            x0 = a * x_t - s * out
            eps = s * x_t + a * out
        return x0, eps

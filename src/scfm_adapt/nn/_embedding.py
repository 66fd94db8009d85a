"""Condition embedders: diffusion time, categorical covariates (with a null row for
classifier-free guidance) and continuous covariates."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._adapters import ExtendableEmbedding


def input_dtype(layer: nn.Module) -> torch.dtype:
    """Floating dtype a linear ``layer`` takes: its weight's, or float32 for a dynamically
    quantized one (whose ``weight`` is a method returning int8; see ``SCFM.quantize``)."""
    w = layer.weight
    return w.dtype if isinstance(w, torch.Tensor) else torch.float32


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a (possibly fractional) time step, then an MLP."""

    def __init__(self, dim: int, n_freq: int = 128, max_period: float = 10_000.0):
        super().__init__()
        self.n_freq = n_freq
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(n_freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, n_freq)
        return self.mlp(emb.to(input_dtype(self.mlp[0])))


class CategoricalEmbedder(nn.Module):
    """Embedding of one categorical covariate with an extra *null* row.

    The last index (``n_categories``) is the null condition used for classifier-free
    guidance; during training each label is replaced by it with probability ``p_uncond``.
    :meth:`extend` adds categories (new trainable rows, inserted before the null row) and
    leaves the pretrained rows untouched.
    """

    def __init__(self, n_categories: int, dim: int, p_uncond: float = 0.1):
        super().__init__()
        self.n_base = n_categories
        self.p_uncond = p_uncond
        self.table = ExtendableEmbedding(n_categories + 1, dim, insert_at=n_categories)
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def n_categories(self) -> int:
        return self.n_base + self.table.n_extra

    @property
    def null_index(self) -> int:
        return self.n_categories

    def extend(self, k: int) -> None:
        """Add ``k`` categories whose embeddings start at the mean pretrained embedding."""
        self.table.extend(k)

    def forward(self, idx: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        idx = idx.long().view(-1)
        if drop is not None:
            idx = torch.where(drop, torch.full_like(idx, self.null_index), idx)
        return self.table(idx)  # (B, dim)


class ContinuousEmbedder(nn.Module):
    """Linear embedding of continuous covariates; a learned vector stands for 'unknown'."""

    def __init__(self, n_features: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(n_features, dim)
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.proj(x.to(input_dtype(self.proj)))  # (B, dim)
        if drop is not None:
            emb = torch.where(drop[:, None], self.null.expand_as(emb), emb)
        return emb

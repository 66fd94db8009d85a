"""Embedders: diffusion time, categorical covariates (with a null row for classifier-free
guidance), continuous covariates, and embedding tables that grow rows for new categories
(query mapping) while the pretrained rows stay frozen."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


class ExtendableEmbedding(nn.Module):
    """An embedding table whose pretrained rows stay frozen while new rows are learned.

    ``weight`` holds the pretrained rows; :meth:`extend` appends ``extra`` rows, a separate
    parameter, so that training the new rows can never move the old ones (no masked
    gradients, no weight decay leaking into frozen rows). ``insert_at`` places the new
    rows before trailing special rows (such as a null row for classifier-free guidance).
    """

    def __init__(self, n: int, dim: int, insert_at: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, dim))
        nn.init.normal_(self.weight)
        self.insert_at = n if insert_at is None else insert_at
        self.extra: nn.Parameter | None = None

    @property
    def n_extra(self) -> int:
        return 0 if self.extra is None else self.extra.shape[0]

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0] + self.n_extra

    def extend(self, k: int, init: torch.Tensor | None = None) -> None:
        """Append ``k`` trainable rows (initialised to ``init``, default the mean old row)."""
        if k <= 0:
            return
        with torch.no_grad():
            base = self.weight[: self.insert_at].mean(0, keepdim=True).expand(k, -1)
            rows = (base if init is None else init).detach().clone().to(self.weight)
        if self.extra is None:
            self.extra = nn.Parameter(rows)
        else:
            self.extra = nn.Parameter(torch.cat([self.extra.data, rows]))

    def table(self) -> torch.Tensor:
        if self.extra is None:
            return self.weight
        w = self.weight
        return torch.cat([w[: self.insert_at], self.extra, w[self.insert_at :]])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx.long(), self.table())

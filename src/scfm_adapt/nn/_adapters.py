"""Bottleneck adapters and embeddings that grow new rows.

Both are "steering" parts for adaptation: each starts as an exact no-op (the adapter's up
projection is zero) or leaves the pretrained rows untouched (new rows live in a separate
parameter), so an adapted model equals its base until it is trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BottleneckAdapter(nn.Module):
    """Houlsby-style residual adapter ``h ↦ up(GELU(down(h)))`` added to a sublayer's output.

    ``up`` is zero-initialised, so the adapter adds exactly zero until trained.
    """

    def __init__(self, dim: int, bottleneck: int = 16, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(F.gelu(self.down(h))))


class AdapterHost(nn.Module):
    """Mixin for transformer blocks with named bottleneck adapters after ``attn`` and ``mlp``.

    ``adapters`` is empty by default (it adds no weights to the state dict);
    :meth:`add_adapter` creates one pair of adapters under a name and
    ``active_adapter`` selects which one runs (``None``: none).
    """

    adapter_dim: int

    def _init_adapters(self, dim: int) -> None:
        self.adapter_dim = dim
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None

    def add_adapter(self, name: str, bottleneck: int = 16, dropout: float = 0.0) -> None:
        if name in self.adapters:
            raise ValueError(f"This block already has an adapter named {name!r}.")
        self.adapters[name] = nn.ModuleDict(
            {
                "attn": BottleneckAdapter(self.adapter_dim, bottleneck, dropout),
                "mlp": BottleneckAdapter(self.adapter_dim, bottleneck, dropout),
            }
        )

    def _adapt(self, where: str, h: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if name is None or name not in self.adapters:
            return h
        return h + self.adapters[name][where](h)


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

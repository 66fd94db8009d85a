"""Bottleneck adapters (Houlsby) and the blocks that host them by name.

A "steering" part for adaptation: the up projection starts at zero, so an adapted block
equals its base until trained. Named adapters are added and switched by
:class:`~scfm_adapt.module.AdaptableMixin`; LoRA is injected by peft there
(:mod:`scfm_adapt.module._lora`), not here.
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

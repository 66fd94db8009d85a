"""Attention pooling of a perturbation's parts: a set of embeddings (with doses) read
into one vector, order-invariant, with the dose-weighted sum as its exact starting point.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PartAttentionPool(nn.Module):
    """Pools the parts of a perturbation, ``(P, K, D)`` embeddings with dose weights
    ``(P, K)``, into ``(P, D)``: the dose-weighted sum plus an attention read-out.

    ``n_heads`` learned queries score every part (a softmax over the parts of one
    perturbation, so a part's weight depends on the others it comes with: the
    interaction a sum cannot express); each head's value is the part's projected
    embedding times its dose weight. The read-out's output projection starts at zero,
    so an untrained pool *is* the sum. It is a set function (``"A+B" == "B+A"``), and
    zero when every dose is zero.
    """

    def __init__(self, dim: int, n_heads: int = 4):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.randn(n_heads, dim // n_heads) * 0.02)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, phi: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor):
        """``phi`` ``(P, K, D)`` part embeddings, ``weight`` ``(P, K)`` their dose weights
        (0 at padding), ``valid`` ``(P, K)`` which entries are parts (not padding)."""
        p, k, d = phi.shape
        h = self.n_heads
        keys = self.key(phi).view(p, k, h, d // h)
        scores = (keys * self.queries).sum(-1) / math.sqrt(d // h)  # (P, K, H)
        scores = scores.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        attn = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a request of padding only: 0
        values = self.value(phi).view(p, k, h, d // h) * weight[..., None, None]
        read = (attn.unsqueeze(-1) * values).sum(1).reshape(p, d)  # (P, D)
        return (phi * weight.unsqueeze(-1)).sum(1) + self.out(read)

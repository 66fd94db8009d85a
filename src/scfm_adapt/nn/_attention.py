"""Multi-head self-attention, MLP and a pre-LN transformer block.

Module names (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) are the LoRA targets,
so keep them stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._adapters import AdapterHost


class Attention(nn.Module):
    """Multi-head self-attention on PyTorch's fused scaled-dot-product kernel."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D/H)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class MLP(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh")))


class TransformerBlock(AdapterHost):
    """Pre-LayerNorm transformer block (used by the token encoder).

    Named bottleneck adapters (see :class:`~scfm_adapt.nn.AdapterHost`) act on the outputs
    of the attention and MLP sublayers, before the residual sum.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)
        self._init_adapters(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._adapt("attn", self.attn(self.norm1(x)))
        return x + self._adapt("mlp", self.mlp(self.norm2(x)))

"""Multi-head self-attention, MLP and a pre-LN transformer block.

Module names (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) are the LoRA targets,
so keep them stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._bottleneck_adapter import AdapterHost


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

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D/H)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        neighbors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention of ``x`` ``(B, T, D)``.

        ``attn_mask`` (boolean, ``True`` = may attend, broadcastable to ``(B, H, T, T)``)
        restricts attention on the dense kernel. ``neighbors`` ``(T, K)`` lists, for each
        token, the tokens it may attend to (``-1`` pads): attention then costs ``O(T K)``
        instead of ``O(T^2)``, for sparse graphs (see :func:`graph_neighbors`).
        """
        b, t, d = x.shape
        q, k, v = self._heads(x)
        p = self.dropout if self.training else 0.0
        if neighbors is not None:
            w = self._neighbor_weights(q, k, neighbors)  # (B, H, T, K)
            w = F.dropout(w, p) if p else w
            idx = neighbors.clamp(min=0)
            out = torch.einsum("bhtk,bhtkd->bhtd", w, v[:, :, idx])  # (B, H, T, D/H)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)

    def _neighbor_weights(
        self, q: torch.Tensor, k: torch.Tensor, neighbors: torch.Tensor
    ) -> torch.Tensor:
        idx = neighbors.clamp(min=0)  # (T, K)
        s = torch.einsum("bhtd,bhtkd->bhtk", q, k[:, :, idx]) * q.shape[-1] ** -0.5
        s = s.masked_fill(neighbors < 0, float("-inf"))
        return s.float().softmax(-1).to(q.dtype)  # (B, H, T, K)

    @torch.no_grad()
    def attention_weights(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        neighbors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention probabilities ``(B, H, T, T)`` that :meth:`forward` uses (for
        inspection and tests; the forward pass never materialises them)."""
        q, k, _ = self._heads(x)
        t = x.shape[1]
        if neighbors is not None:
            w = self._neighbor_weights(q, k, neighbors)
            dense = torch.zeros(*w.shape[:3], t + 1, dtype=w.dtype, device=w.device)
            # padding slots (-1) land in a spare column that is dropped
            dense.scatter_add_(-1, neighbors.where(neighbors >= 0, t).expand_as(w), w)
            return dense[..., :t]
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, T, T)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf"))
        return s.float().softmax(-1)


def graph_neighbors(edges: torch.Tensor, n: int) -> torch.Tensor:
    """Neighbour lists ``(n, K)`` (``-1`` pads) of an undirected graph on ``n`` tokens.

    ``edges`` ``(E, 2)``; every token also attends to itself. ``K`` is the largest degree
    plus one, so attention over the lists costs ``O(n K)``.
    """
    loops = torch.arange(n, device=edges.device)
    src = torch.cat([edges[:, 0], edges[:, 1], loops])
    dst = torch.cat([edges[:, 1], edges[:, 0], loops])
    key = torch.unique(src * n + dst)  # sorted: by source, then target; duplicates dropped
    src, dst = key // n, key % n
    deg = torch.bincount(src, minlength=n)
    start = torch.cumsum(deg, 0) - deg
    slot = torch.arange(src.numel(), device=edges.device) - start[src]
    out = torch.full((n, int(deg.max())), -1, dtype=torch.long, device=edges.device)
    out[src, slot] = dst
    return out


def graph_mask(edges: torch.Tensor, n: int) -> torch.Tensor:
    """Dense boolean mask ``(n, n)`` of an undirected graph, self-loops included."""
    mask = torch.eye(n, dtype=torch.bool, device=edges.device)
    mask[edges[:, 0], edges[:, 1]] = True
    mask[edges[:, 1], edges[:, 0]] = True
    return mask


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

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        neighbors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self._adapt("attn", self.attn(self.norm1(x), attn_mask, neighbors))
        return x + self._adapt("mlp", self.mlp(self.norm2(x)))

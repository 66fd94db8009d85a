"""Query pooling: learned queries read a variable token sequence into the fixed latent shape.

The pathway, rank and Geneformer encoders attend over tokens of their own (pathways, genes)
and end like :class:`~scfm_adapt.nn.TokenEncoder`: ``n_tokens`` learned queries pool the
token states by cross-attention (a Perceiver-style read-out), so the latent that the decoder
and the DiT see keeps its short shape ``(n_tokens, token_dim)`` whatever the tokenizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import TransformerBlock
from ._token_encoder import PosteriorEncoder


class QueryPool(nn.Module):
    """``n_queries`` learned queries attend to a token sequence: ``(B, T, D) → (B, Q, D)``.

    The output adds the queries themselves (a residual), so every query has a state even
    when it attends to little.
    """

    def __init__(self, dim: int, n_queries: int, n_heads: int = 4):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.randn(1, n_queries, dim) * 0.02)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor):
        b, t, d = x.shape
        h = self.n_heads
        q = self.q(self.queries).expand(b, -1, -1)  # (B, Q, D)
        q = q.view(b, -1, h, d // h).transpose(1, 2)  # (B, H, Q, D/H)
        k, v = self.kv(x).view(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, H, T, D/H)
        return q, k, v

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` ``(B, T)``: which tokens may be attended to (at least one per cell)."""
        b, _, d = x.shape
        q, k, v = self._heads(x)
        mask = None if valid is None else valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Q, D/H)
        return self.queries + self.proj(out.transpose(1, 2).reshape(b, -1, d))  # (B, Q, D)


class PooledEncoder(PosteriorEncoder):
    """Shared tail: transformer blocks over tokens, query pooling, posterior head."""

    def _init_tail(self, n_tokens, token_dim, hidden, depth, n_heads, dropout, var_eps) -> None:
        self.n_tokens, self.token_dim, self.hidden, self.var_eps = (
            n_tokens,
            token_dim,
            hidden,
            var_eps,
        )
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [TransformerBlock(hidden, n_heads, 2.0, dropout) for _ in range(depth)]
        )
        self.pool = QueryPool(hidden, n_tokens, n_heads)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 2 * token_dim)

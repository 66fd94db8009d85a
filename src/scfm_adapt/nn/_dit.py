"""Diffusion Transformer over latent tokens, with adaLN-Zero conditioning.

The denoiser knows nothing of the noise schedule: it maps noisy tokens, a time step and
conditions to a prediction (the schedule's parametrisation decides of what).
"""

from __future__ import annotations

import torch
from torch import nn

from ._attention import MLP, Attention
from ._bottleneck_adapter import AdapterHost
from ._embedding import CategoricalEmbedder, ContinuousEmbedder, TimestepEmbedder


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FiLM on a parameter-free LayerNorm: ``x * (1 + scale) + shift`` per sequence."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(AdapterHost):
    """Transformer block whose norms are modulated by the condition (adaLN-Zero).

    The modulation's linear layer starts at zero, so the gates are zero and the block is
    the identity at initialisation. Named bottleneck adapters act on the sublayer outputs
    before the gates.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, n_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)
        self._init_adapters(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # (B, D)
        a = self._adapt("attn", self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + gate1.unsqueeze(1) * a
        m = self._adapt("mlp", self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x + gate2.unsqueeze(1) * m


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised projection back to token space."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        for layer in (self.adaLN[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Denoiser of a sequence of ``n_tokens`` latent tokens of width ``token_dim``.

    Parameters
    ----------
    n_tokens, token_dim
        Shape of one cell's latent, ``(n_tokens, token_dim)``.
    hidden, depth, n_heads, mlp_ratio
        Transformer size.
    categorical_sizes
        Name → number of categories of each categorical condition (batch, labels, ...).
        Each gets an embedder with a null row for classifier-free guidance.
    n_continuous
        Number of continuous covariates (embedded jointly), 0 for none.
    p_uncond
        Probability that a condition is replaced by its null during training.
    """

    def __init__(
        self,
        n_tokens: int,
        token_dim: int,
        hidden: int = 128,
        depth: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        categorical_sizes: dict[str, int] | None = None,
        n_continuous: int = 0,
        p_uncond: float = 0.1,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_tokens, self.token_dim, self.p_uncond = n_tokens, token_dim, p_uncond
        self.x_embed = nn.Linear(token_dim, hidden)
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, hidden) * 0.02)
        self.t_embed = TimestepEmbedder(hidden)
        self.cat_embed = nn.ModuleDict(
            {
                k: CategoricalEmbedder(n, hidden, p_uncond)
                for k, n in (categorical_sizes or {}).items()
            }
        )
        self.cont_embed = ContinuousEmbedder(n_continuous, hidden) if n_continuous else None
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden, n_heads, mlp_ratio, dropout) for _ in range(depth)]
        )
        self.final = FinalLayer(hidden, token_dim)

    @property
    def condition_names(self) -> list[str]:
        names = list(self.cat_embed)
        return [*names, "continuous"] if self.cont_embed is not None else names

    def embed_conditions(
        self,
        t: torch.Tensor,
        conditions: dict[str, torch.Tensor] | None = None,
        drop: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Sum of the time embedding and every condition's embedding, shape ``(B, hidden)``.

        A condition absent from ``conditions`` is null (unconditional) for every cell;
        ``drop[name]`` is a boolean mask of cells whose condition is set to null.
        """
        conditions, drop = conditions or {}, drop or {}
        c = self.t_embed(t)
        n = t.shape[0]
        for name, emb in self.cat_embed.items():
            if name in conditions:
                c = c + emb(conditions[name], drop.get(name))
            else:
                c = c + emb(torch.full((n,), emb.null_index, device=t.device))
        if self.cont_embed is not None:
            x = conditions.get("continuous")
            if x is None:
                c = c + self.cont_embed.null.expand(n, -1)
            else:
                c = c + self.cont_embed(x, drop.get("continuous"))
        return c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        conditions: dict[str, torch.Tensor] | None = None,
        drop: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        c = self.embed_conditions(t, conditions, drop)  # (B, H)
        h = self.x_embed(x) + self.pos_embed  # (B, T, H)
        for block in self.blocks:
            h = block(h, c)  # (B, T, H)
        return self.final(h, c)  # (B, T, token_dim)

"""The stage-1 encoder: one cell's normalised expression → ``n_tokens`` latent tokens.

:class:`PosteriorEncoder` is what every encoder shares (the latent, pathway, rank and
Geneformer tokenizers); :class:`TokenEncoder` is the default ``"latent"`` tokenizer. Library
size and count noise live in the decoder's likelihood (:mod:`._count_decoder`), never here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import TransformerBlock


class PosteriorEncoder(nn.Module):
    """What every stage-1 encoder shares: ``features(x)`` ``(B, n_tokens, hidden)`` read by
    ``head`` into the posterior mean and variance of the tokens, each
    ``(B, n_tokens, token_dim)``; and the names the adaptation machinery looks for."""

    #: LoRA targets (module names under ``encoder.blocks.<i>``).
    lora_targets: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    #: Parts loaded from an external checkpoint (none: trained from scratch).
    pretrained_prefixes: tuple[str, ...] = ()
    head: nn.Linear
    var_eps: float

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_var = self.head(self.features(x)).chunk(2, dim=-1)  # (B, T, d) each
        return mean, F.softplus(raw_var) + self.var_eps


class TokenEncoder(PosteriorEncoder):
    """Genes → ``n_tokens`` tokens (one linear map), then a small transformer.

    Returns the posterior mean and variance of the latent tokens, each
    ``(B, n_tokens, token_dim)``.
    """

    def __init__(
        self,
        n_genes: int,
        n_tokens: int = 8,
        token_dim: int = 16,
        hidden: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        self.n_tokens, self.hidden, self.var_eps = n_tokens, hidden, var_eps
        self.gene_to_tokens = nn.Linear(n_genes, n_tokens * hidden)
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, hidden) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [TransformerBlock(hidden, n_heads, 2.0, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 2 * token_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states of the last block, ``(B, n_tokens, hidden)``."""
        b = x.shape[0]
        h = self.gene_to_tokens(self.drop(x)).view(b, self.n_tokens, self.hidden)  # (B, T, H)
        h = h + self.pos_embed
        for block in self.blocks:
            h = block(h)  # (B, T, H)
        return self.norm(h)

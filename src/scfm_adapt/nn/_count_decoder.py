"""The stage-1 decoder: latent tokens → gene-wise expression fractions (and zero-inflation
logits) for the NB / ZINB / Poisson likelihoods, plus the library-size model used when
generating cells. Covariates enter here, so the latent need not carry them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._embedding import ExtendableEmbedding


class TokenDecoder(nn.Module):
    """Tokens → gene-wise expression fractions (and zero-inflation logits).

    Covariates (batch and any categorical covariates) enter as additive embeddings of the
    hidden layer, so that the latent need not carry them.
    """

    def __init__(
        self,
        n_genes: int,
        n_tokens: int,
        token_dim: int,
        hidden: int = 256,
        categorical_sizes: list[int] | None = None,
        zero_inflation: bool = False,
        dropout: float = 0.0,
        library_hidden: int | None = None,
    ):
        super().__init__()
        self.fc = nn.Linear(n_tokens * token_dim, hidden)
        self.cov_embed = nn.ModuleList(
            ExtendableEmbedding(n, hidden) for n in categorical_sizes or []
        )
        for emb in self.cov_embed:
            nn.init.zeros_(emb.weight)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.scale_head = nn.Linear(hidden, n_genes)
        self.dropout_head = nn.Linear(hidden, n_genes) if zero_inflation else None
        # Library-size model: log library ~ Normal(mu, sigma) given the tokens and the
        # covariates, for generation (the callers detach the tokens: the latent is never
        # asked to carry sequencing depth).
        library_hidden = library_hidden or max(8, hidden // 4)
        self.lib_fc = nn.Linear(n_tokens * token_dim, library_hidden)
        self.lib_embed = nn.ModuleList(
            ExtendableEmbedding(n, library_hidden) for n in categorical_sizes or []
        )
        for emb in self.lib_embed:
            nn.init.zeros_(emb.weight)
        self.lib_out = nn.Linear(library_hidden, 2)

    def hidden_state(
        self, z: torch.Tensor, covariates: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The shared hidden layer ``(B, hidden)`` that every output head reads."""
        h = self.fc(z.flatten(1))  # (B, hidden)
        for emb, idx in zip(self.cov_embed, covariates or []):
            h = h + emb(idx.long().view(-1))
        return self.drop(F.gelu(self.norm(h)))

    def forward(
        self, z: torch.Tensor, covariates: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.hidden_state(z, covariates)
        scale = torch.softmax(self.scale_head(h).float(), dim=-1)  # (B, G), rows sum to 1
        logits = self.dropout_head(h).float() if self.dropout_head is not None else None
        return scale, logits

    def library(
        self, z: torch.Tensor, covariates: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the log library size, each ``(B, 1)``."""
        return self._library_params(self.lib_out, self.library_hidden(z, covariates))

    def library_hidden(
        self, z: torch.Tensor, covariates: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Hidden layer of the library model, ``(B, library_hidden)``."""
        h = self.lib_fc(z.flatten(1))
        for emb, idx in zip(self.lib_embed, covariates or []):
            h = h + emb(idx.long().view(-1))
        return F.gelu(h)

    @staticmethod
    def _library_params(out: nn.Linear, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = out(h).float().chunk(2, dim=-1)
        return mu, F.softplus(log_sigma) + 1e-3

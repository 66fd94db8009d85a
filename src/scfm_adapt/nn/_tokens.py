"""Gene ↔ token maps of the stage-1 VAE.

The encoder turns one cell's normalised expression into ``n_tokens`` latent tokens (a
posterior mean and variance per token); the decoder maps tokens back to gene-wise
parameters. Library size and count noise live in the decoder's likelihood, never here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._adapters import ExtendableEmbedding
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

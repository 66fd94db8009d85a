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


def effective_rank(rank: int | None, n_in: int, n_out: int) -> int | None:
    """``rank`` where a factorised ``n_in → rank → n_out`` map costs less than a full one,
    else ``None``."""
    if rank is None:
        return None
    if rank < 1:
        raise ValueError(f"encoder_rank={rank}; use a positive integer or None (a full map).")
    return rank if rank * (n_in + n_out) < n_in * n_out else None


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

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean alone, ``(B, n_tokens, token_dim)``: what an embedding needs,
        without the variance's half of the head or its softplus. A head wrapped by an
        adapter or quantized runs whole."""
        if type(self.head) is not nn.Linear:
            return self(x)[0]
        d = self.head.out_features // 2
        return F.linear(self.features(x), self.head.weight[:d], self.head.bias[:d])


class TokenEncoder(PosteriorEncoder):
    """Genes → ``n_tokens`` tokens (one linear map), then a small transformer.

    Returns the posterior mean and variance of the latent tokens, each
    ``(B, n_tokens, token_dim)``.

    With ``rank`` the gene map is factorised: genes → ``rank`` (``gene_down``, no bias) →
    tokens (``gene_to_tokens``). The gene map is the largest matmul of the encoder, and
    the factorisation cuts its work by ``n_tokens * hidden / rank`` for many genes. It is
    used only where it saves work (``rank * (n_genes + n_tokens * hidden) <
    n_genes * n_tokens * hidden``); ``rank=None`` keeps one full map (models saved before
    the option).
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
        rank: int | None = None,
    ):
        super().__init__()
        self.n_tokens, self.hidden, self.var_eps = n_tokens, hidden, var_eps
        self.rank = effective_rank(rank, n_genes, n_tokens * hidden)
        # Genes → rank factors (None: the full map below reads the genes directly).
        self.gene_down = nn.Linear(n_genes, self.rank, bias=False) if self.rank else None
        self.gene_to_tokens = nn.Linear(self.rank or n_genes, n_tokens * hidden)
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
        x = self.drop(x)
        if self.gene_down is not None:
            x = self.gene_down(x)  # (B, rank)
        h = self.gene_to_tokens(x).view(b, self.n_tokens, self.hidden)  # (B, T, H)
        h = h + self.pos_embed
        for block in self.blocks:
            h = block(h)  # (B, T, H)
        return self.norm(h)

"""What the encoders around external backbones (Geneformer, scGPT) share: the read-out from
the backbone's token states to the latent tokens, and loading the backbone's tensors."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from ._query_pool import QueryPool
from ._token_encoder import PosteriorEncoder


class ExternalBackboneEncoder(PosteriorEncoder):
    """An external backbone's token states → ``n_tokens`` latent tokens: learned queries
    pool the states (``pool``), LayerNorm (``norm``) and a head (``head``) give each token's
    posterior mean and variance. Subclasses hold the backbone and ``gene_token_ids``."""

    gene_token_ids: torch.Tensor

    def _init_readout(
        self,
        hidden: int,
        n_tokens: int,
        token_dim: int,
        n_heads: int,
        dropout: float,
        var_eps: float,
    ) -> None:
        self.hidden, self.n_tokens, self.token_dim = hidden, n_tokens, token_dim
        self.var_eps = var_eps
        self.pool = QueryPool(hidden, n_tokens, n_heads)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 2 * token_dim)

    def _set_gene_token_ids(self, gene_token_ids, vocab_size: int) -> None:
        """Register each input gene's token id (``-1``: outside the vocabulary) as the
        buffer ``gene_token_ids``, refusing ids the backbone has no embedding for."""
        ids = torch.as_tensor(gene_token_ids, dtype=torch.long).reshape(-1)
        bad = ids[(ids < -1) | (ids >= vocab_size)]
        if bad.numel():
            raise CheckpointError(
                f"gene_token_ids hold {bad[:3].tolist()}, outside the model's vocabulary of "
                f"{vocab_size} tokens (-1 marks a gene outside it); the vocabulary (token "
                "dictionary) does not belong to this checkpoint."
            )
        self.register_buffer("gene_token_ids", ids)

    @property
    def n_genes(self) -> int:
        return self.gene_token_ids.shape[0]


def top_genes(
    score: torch.Tensor, valid: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each cell's (at most ``max_len``) highest-scoring valid genes.

    Returns ``order`` ``(B, k)``, gene indices by falling ``score`` (a stable sort: ties in
    gene order; ``score`` must be ``-inf`` where not ``valid``), ``mask`` ``(B, k)``, true
    for a cell's own genes, and ``n`` ``(B,)``, the genes each cell keeps; ``k`` is the
    largest ``n`` of the batch.
    """
    n = valid.sum(1).clamp(max=max_len)  # (B,)
    k = int(n.max()) if n.numel() else 0
    # A stable sort keeps ties in gene order; topk gives no such guarantee.
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    mask = torch.arange(k, device=score.device) < n[:, None]  # (B, k)
    return order, mask, n


@torch.no_grad()
def copy_strict(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor], fix: str) -> None:
    """Copy ``given`` into the encoder's tensors ``own`` (same names): every one of ``own``
    must be given with its shape, and nothing else.

    Raises
    ------
    CheckpointError
        Missing, unexpected or mis-shaped keys (up to 8 of each named), then ``fix``.
    """
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shapes = [
        f"{k}: {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(given))
        if tuple(given[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys {unexpected[:8]}")
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model) {shapes[:8]}")
        raise CheckpointError(
            "The backbone weights do not fit this encoder: " + "; ".join(parts) + f". {fix}"
        )
    for k, t in own.items():
        t.copy_(given[k])

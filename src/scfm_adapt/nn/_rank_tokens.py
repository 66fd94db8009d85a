"""The ``"rank"`` tokenizer: the cell's top-``k`` genes by normalised expression, as gene-id
tokens in rank order (Geneformer's input) with learned gene embeddings; a gene graph can
restrict attention to each cell's induced subgraph.
"""

from __future__ import annotations

import torch
from torch import nn

from ._query_pool import PooledEncoder


class RankTokenEncoder(PooledEncoder):
    """The cell's top-``k`` genes by normalised expression, in rank order, as gene-id tokens
    (Geneformer's tokenisation), with learned gene and rank embeddings.

    A gene's score is its normalised expression divided by its median over the cells that
    express it (``gene_median``, fitted on the training data): housekeeping genes, high
    everywhere, sink; genes high *for them* rise. Genes not expressed never enter; ties
    break by gene index (a stable sort), so tokenisation is deterministic. A learned cell
    token always leads the sequence, so a cell expressing nothing still has a state.

    ``n_edges`` sorted keys ``i * n_genes + j`` of a gene graph (both directions) restrict
    attention between gene tokens to the cell's induced subgraph (each token also attends
    to itself and to the cell token).
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
        top_k: int = 64,
        n_edges: int = 0,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k={top_k}; keep at least one gene per cell.")
        self.n_genes, self.top_k = n_genes, top_k
        self.register_buffer("gene_median", torch.ones(n_genes))
        self.register_buffer("edge_keys", torch.zeros(n_edges, dtype=torch.long))
        self.gene_embed = nn.Embedding(n_genes, hidden)
        nn.init.normal_(self.gene_embed.weight, std=0.02)
        self.rank_embed = nn.Parameter(torch.randn(top_k, hidden) * 0.02)
        self.cell_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self._init_tail(n_tokens, token_dim, hidden, depth, n_heads, dropout, var_eps)

    @torch.no_grad()
    def set_gene_medians(self, median: torch.Tensor) -> None:
        median = torch.as_tensor(median, dtype=torch.float32)
        if median.shape != self.gene_median.shape or not bool((median > 0).all()):
            raise ValueError("gene medians must be positive, one per gene.")
        self.gene_median.copy_(median)

    @torch.no_grad()
    def set_graph(self, edges: torch.Tensor) -> None:
        """Undirected gene-graph edges ``(E, 2)`` between gene indices (``E`` = half of
        ``n_edges``: both directions are stored)."""
        edges = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2)
        keys = torch.cat(
            [edges[:, 0] * self.n_genes + edges[:, 1], edges[:, 1] * self.n_genes + edges[:, 0]]
        )
        keys = torch.unique(keys)
        if keys.shape != self.edge_keys.shape:
            raise ValueError(
                f"Expected {self.edge_keys.numel()} directed edges, got {keys.numel()}."
            )
        self.edge_keys.copy_(keys)

    @property
    def has_graph(self) -> bool:
        return self.edge_keys.numel() > 0

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Gene indices ``(B, L)`` in rank order, ``-1`` after the last expressed gene;
        ``L = min(top_k, most genes any cell of the batch expresses)``, at least 1."""
        score = torch.expm1(x.float()) / self.gene_median  # (B, G)
        score = score.masked_fill(x <= 0, -1.0)
        value, order = torch.sort(score, dim=-1, descending=True, stable=True)
        n_expr = int((value[:, : self.top_k] > 0).sum(-1).max().item()) if x.numel() else 0
        length = max(1, min(self.top_k, n_expr))
        idx = order[:, :length]
        return idx.masked_fill(value[:, :length] <= 0, -1)

    def gene_attention_mask(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 1 + L, 1 + L)``: which tokens (cell token first) may attend to which."""
        b, length = idx.shape
        valid = torch.cat([idx.new_ones(b, 1, dtype=torch.bool), idx >= 0], 1)  # (B, 1+L)
        allowed = valid[:, None, :].expand(b, 1 + length, 1 + length).clone()
        if self.has_graph:
            gi = idx.clamp(min=0)
            key = gi[:, :, None] * self.n_genes + gi[:, None, :]  # (B, L, L)
            pos = torch.searchsorted(self.edge_keys, key).clamp(max=self.edge_keys.numel() - 1)
            edge = self.edge_keys[pos] == key
            allowed[:, 1:, 1:] &= edge
        eye = torch.eye(1 + length, dtype=torch.bool, device=idx.device)
        return (allowed | eye)[:, None]  # padded tokens attend to themselves only

    def token_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings ``(B, 1 + L, hidden)`` (cell token first) and gene indices."""
        idx = self.tokenize(x)
        h = self.gene_embed(idx.clamp(min=0)) + self.rank_embed[: idx.shape[1]]
        h = h * (idx >= 0)[..., None].to(h.dtype)  # (B, L, H)
        cell = self.cell_token.expand(x.shape[0], -1, -1).to(h.dtype)
        return torch.cat([cell, h], 1), idx

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h, idx = self.token_inputs(x)
        mask = self.gene_attention_mask(idx)
        valid = mask[:, 0, 0]  # the cell token's row: every real token
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, mask)  # (B, 1+L, H)
        return self.norm(self.pool(h, valid))  # (B, n_tokens, H)

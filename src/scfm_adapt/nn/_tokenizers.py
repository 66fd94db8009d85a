"""Encoders that read a cell as pathway tokens or as rank-ordered gene tokens.

Both end like :class:`~scfm_adapt.nn.TokenEncoder`: ``n_tokens`` learned queries pool the
token states by cross-attention (a Perceiver-style read-out), so the latent that the decoder
and the DiT see keeps its short shape ``(n_tokens, token_dim)`` whatever the tokenizer. What
changes is what the encoder's transformer attends over:

``PathwayTokenEncoder``
    one token per gene set, a learned weighting of its member genes' expression: attention
    and attributions read as pathways.
``RankTokenEncoder``
    the top-``k`` genes of the cell by normalised expression, as gene-id tokens in rank order
    (Geneformer's input), with learned gene embeddings.

A gene graph can restrict attention between tokens (:func:`~scfm_adapt.nn.graph_mask`):
pathway tokens take a fixed graph, run over neighbour lists when it is sparse; gene tokens
take each cell's induced subgraph of a gene graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import TransformerBlock, graph_mask, graph_neighbors
from ._tokens import PosteriorEncoder


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


class _PooledEncoder(PosteriorEncoder):
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


class PathwayTokenEncoder(_PooledEncoder):
    """One token per gene set, then a transformer over pathway tokens (optionally masked by
    a pathway graph), pooled into ``n_tokens`` latent tokens.

    Token ``p`` starts as ``W_in s_p + e_p``: ``s_p`` ``(n_channels,)`` are learned weighted
    sums of the normalised expression of the set's member genes (one weight per member and
    channel, so a gene counts differently in each of its sets), ``e_p`` the set's identity
    embedding. A gene in no set can go to a catch-all set (the model adds one), so no
    expression is invisible to the encoder.

    Memberships and the graph are buffers sized by ``n_members`` and ``n_edges`` (filled by
    :meth:`set_gene_sets` and :meth:`set_graph`), so they travel in the state dict.

    Parameters
    ----------
    n_genes, n_sets, n_members
        Genes, gene sets (tokens) and (set, gene) memberships.
    n_tokens, token_dim
        Shape of the latent.
    hidden, depth, n_heads, dropout
        The transformer over pathway tokens.
    n_channels
        Weighted sums per set.
    n_edges
        Edges of the pathway graph (0: every token attends to every token).
    sparse_threshold
        Graphs with fewer allowed pairs than this fraction of all pairs run on neighbour
        lists, ``O(T K)``; others on the fused kernel with a ``(T, T)`` mask. Default 0:
        always the mask, because on a CPU the fused kernel was faster and leaner at every
        size measured (64 to 4,096 tokens, 0.2% to 13% of pairs allowed: 1.1 to 5 times
        faster, half the peak memory; ``benchmarks/graph_attention.py``). Neighbour lists
        are for graphs over more tokens than a ``T × T`` mask can hold.
    """

    def __init__(
        self,
        n_genes: int,
        n_sets: int,
        n_members: int,
        n_tokens: int = 8,
        token_dim: int = 16,
        hidden: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        n_channels: int = 4,
        n_edges: int = 0,
        sparse_threshold: float = 0.0,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        self.n_genes, self.n_sets, self.n_channels = n_genes, n_sets, n_channels
        self.sparse_threshold = sparse_threshold
        self.register_buffer("member_gene", torch.zeros(n_members, dtype=torch.long))
        self.register_buffer("member_set", torch.zeros(n_members, dtype=torch.long))
        self.register_buffer("edges", torch.zeros(n_edges, 2, dtype=torch.long))
        self.member_weight = nn.Parameter(torch.zeros(n_members, n_channels))
        self.token_in = nn.Linear(n_channels, hidden)
        self.set_embed = nn.Parameter(torch.randn(n_sets, hidden) * 0.02)
        self._init_tail(n_tokens, token_dim, hidden, depth, n_heads, dropout, var_eps)
        self._graph_cache: tuple | None = None

    @torch.no_grad()
    def set_gene_sets(self, member_set: torch.Tensor, member_gene: torch.Tensor) -> None:
        """Memberships as parallel index arrays; weights start at the set mean (channel 0)
        and small random contrasts (other channels), each scaled by the set's size."""
        member_set = torch.as_tensor(member_set, dtype=torch.long)
        member_gene = torch.as_tensor(member_gene, dtype=torch.long)
        if member_set.shape != self.member_set.shape or member_gene.shape != member_set.shape:
            raise ValueError(
                f"Expected {self.member_set.numel()} memberships, got {member_set.numel()}."
            )
        if member_set.numel() and (
            int(member_set.max()) >= self.n_sets or int(member_gene.max()) >= self.n_genes
        ):
            raise ValueError("A membership points past the last gene set or gene.")
        self.member_set.copy_(member_set)
        self.member_gene.copy_(member_gene)
        size = torch.bincount(member_set, minlength=self.n_sets).clamp(min=1).float()
        inv = size[member_set].rsqrt()[:, None]  # (M, 1)
        w = torch.randn(self.member_weight.shape) * inv
        w[:, 0] = inv[:, 0]
        self.member_weight.copy_(w)

    @torch.no_grad()
    def set_graph(self, edges: torch.Tensor) -> None:
        """Undirected pathway-graph edges ``(E, 2)`` between set indices."""
        edges = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2)
        if edges.shape != self.edges.shape:
            raise ValueError(f"Expected {self.edges.shape[0]} edges, got {edges.shape[0]}.")
        self.edges.copy_(edges)
        self._graph_cache = None

    @property
    def has_graph(self) -> bool:
        return self.edges.shape[0] > 0

    def graph(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(attn_mask, neighbors)`` for the blocks: one of them, or neither."""
        if not self.has_graph:
            return None, None
        key = (self.edges.data_ptr(), self.edges._version, self.edges.device)
        if self._graph_cache is None or self._graph_cache[0] != key:
            n = self.n_sets
            mask = graph_mask(self.edges, n)
            if mask.float().mean().item() < self.sparse_threshold:
                self._graph_cache = (key, None, graph_neighbors(self.edges, n))
            else:
                self._graph_cache = (key, mask, None)
        return self._graph_cache[1], self._graph_cache[2]

    def pooled_expression(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted sums of each set's member genes, ``(B, n_sets, n_channels)``."""
        vals = x[:, self.member_gene, None] * self.member_weight.to(x.dtype)  # (B, M, C)
        out = x.new_zeros(x.shape[0], self.n_sets, self.n_channels)
        return out.index_add_(1, self.member_set, vals)

    def token_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Pathway tokens before the transformer, ``(B, n_sets, hidden)``: what pathway
        attributions are computed on."""
        return self.token_in(self.pooled_expression(x)) + self.set_embed

    def features_from_inputs(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised pooled states ``(B, n_tokens, hidden)`` of token inputs ``h``."""
        attn_mask, neighbors = self.graph()
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, attn_mask, neighbors)  # (B, P, H)
        return self.norm(self.pool(h))  # (B, n_tokens, H)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_from_inputs(self.token_inputs(x))


class RankTokenEncoder(_PooledEncoder):
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

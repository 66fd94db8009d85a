"""The ``"pathway"`` tokenizer: one token per gene set, a learned weighting of its member
genes' expression, so attention and attributions read as pathways.

A pathway graph can restrict attention between tokens (:func:`~scfm_adapt.nn.graph_mask`),
run over neighbour lists when it is sparse.
"""

from __future__ import annotations

import torch
from torch import nn

from ._attention import graph_mask, graph_neighbors
from ._query_pool import PooledEncoder


class PathwayTokenEncoder(PooledEncoder):
    """One token per gene set, then a transformer over pathway tokens (optionally masked by
    a pathway graph), pooled into ``n_tokens`` latent tokens.

    Token ``p`` starts as ``W_p s_p + e_p``: ``s_p`` ``(n_channels,)`` are learned weighted
    sums of the normalised expression of the set's member genes (one weight per member and
    channel, so a gene counts differently in each of its sets), ``W_p`` the set's own input
    map (``per_set_inputs``) and ``e_p`` the set's identity embedding. A gene in no set can
    go to a catch-all set (the model adds one), so no expression is invisible to the
    encoder.

    With one input map shared by every set (``per_set_inputs=False``, models saved before
    the option), two sets with the same sums give the same token up to the small ``e_p``:
    attention and the query pooling then cannot tell which pathway a value came from, and
    much of what the sums hold is lost (``benchmarks/README.md``, "Pathway tokens").

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
    per_set_inputs
        Give each set its own input map ``W_p`` (``n_channels × hidden``) instead of one
        shared map.
    sparse_threshold
        Graphs with fewer allowed pairs than this fraction of all pairs run on neighbour
        lists, ``O(T K)``; others on the fused kernel with a ``(T, T)`` mask. Default 0:
        always the mask, because on a CPU the fused kernel was faster and leaner at every
        size measured (``benchmarks/graph_attention.py``, figures in
        ``benchmarks/README.md``). Neighbour lists are for graphs over more tokens than a
        ``T × T`` mask can hold.
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
        per_set_inputs: bool = False,
    ):
        super().__init__()
        self.n_genes, self.n_sets, self.n_channels = n_genes, n_sets, n_channels
        self.sparse_threshold = sparse_threshold
        self.register_buffer("member_gene", torch.zeros(n_members, dtype=torch.long))
        self.register_buffer("member_set", torch.zeros(n_members, dtype=torch.long))
        self.register_buffer("edges", torch.zeros(n_edges, 2, dtype=torch.long))
        self.member_weight = nn.Parameter(torch.zeros(n_members, n_channels))
        self.per_set_inputs = per_set_inputs
        # what a CellAnnotator's LoRA or bottleneck adapter also trains (``train_params``):
        # the gene → pathway weights (benchmarks/README.md, "pathway_tokens.py")
        self.annotator_trainable = ("member_weight", "set_in") if per_set_inputs else ()
        if per_set_inputs:  # nn.Linear's initialisation, one map per set
            bound = n_channels**-0.5
            self.set_in = nn.Parameter(
                torch.empty(n_sets, n_channels, hidden).uniform_(-bound, bound)
            )
        else:
            self.token_in = nn.Linear(n_channels, hidden)
        self.set_embed = nn.Parameter(torch.randn(n_sets, hidden) * 0.02)
        self._init_tail(n_tokens, token_dim, hidden, depth, n_heads, dropout, var_eps)
        self._graph_cache: tuple | None = None

    @torch.no_grad()
    def set_gene_sets(
        self,
        member_set: torch.Tensor,
        member_gene: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Memberships as parallel index arrays. Weights start at ``weights`` ``(M,
        n_channels)`` when given (such as :func:`~scfm_adapt.data.set_components`), else at
        the set mean (channel 0) and small random contrasts (other channels), each scaled
        by the set's size."""
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
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=w.dtype)
            if weights.shape != w.shape:
                raise ValueError(f"Expected weights of shape {tuple(w.shape)}.")
            w = weights
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
        s = self.pooled_expression(x)  # (B, P, C)
        if self.per_set_inputs:
            return torch.einsum("bpc,pch->bph", s, self.set_in.to(s.dtype)) + self.set_embed
        return self.token_in(s) + self.set_embed

    def features_from_inputs(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised pooled states ``(B, n_tokens, hidden)`` of token inputs ``h``."""
        attn_mask, neighbors = self.graph()
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, attn_mask, neighbors)  # (B, P, H)
        return self.norm(self.pool(h))  # (B, n_tokens, H)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_from_inputs(self.token_inputs(x))

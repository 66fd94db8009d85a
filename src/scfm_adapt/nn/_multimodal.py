"""Joint tokens of several modalities (RNA, protein, ATAC) for the stage-1 VAE.

Each modality has its own tokenizer (a linear map of its normalised features to its own
block of tokens). The blocks join into one sequence, with a learned embedding of the
modality each token belongs to, and one transformer mixes them. A modality a cell lacks is
*masked*: its block is a learned mask embedding, which carries no data (never the
tokenizer's output on zero-filled input), so the other modalities' tokens fill it in through
attention, as in masked modelling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import TransformerBlock
from ._count_decoder import TokenDecoder

#: Outputs per feature of each extra modality's decoder head, by likelihood.
HEAD_WIDTH = {"mixture": 3, "nb": 1, "poisson": 1}


class MultimodalTokenEncoder(nn.Module):
    """Modalities → one sequence of latent tokens, ``n_tokens`` per modality.

    ``sizes`` maps each modality, in sequence order, to ``(n_features, n_tokens)``. Returns
    the posterior mean and variance ``(B, sum n_tokens, token_dim)``. The RNA tokenizer is
    called ``gene_to_tokens`` like :class:`~scfm_adapt.nn.TokenEncoder`'s; the transformer
    blocks are ``blocks`` (the targets of the adaptation strategies, as there).
    """

    def __init__(
        self,
        sizes: dict[str, tuple[int, int]],
        token_dim: int = 16,
        hidden: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        if next(iter(sizes), None) != "rna":
            raise ValueError("sizes must start with the 'rna' modality.")
        self.sizes = dict(sizes)
        self.hidden, self.var_eps = hidden, var_eps
        self.n_tokens = sum(t for _, t in self.sizes.values())
        n_genes, n_rna = self.sizes["rna"]
        self.gene_to_tokens = nn.Linear(n_genes, n_rna * hidden)
        self.mod_to_tokens = nn.ModuleDict(
            {m: nn.Linear(f, t * hidden) for m, (f, t) in self.sizes.items() if m != "rna"}
        )
        self.mask_tokens = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(1, t, hidden) * 0.02) for m, (_, t) in sizes.items()}
        )
        self.modality_embed = nn.Embedding(len(self.sizes), hidden)
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        ids = torch.cat([torch.full((t,), i) for i, (_, t) in enumerate(self.sizes.values())])
        self.register_buffer("modality_ids", ids, persistent=False)
        self.pos_embed = nn.Parameter(torch.randn(1, self.n_tokens, hidden) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [TransformerBlock(hidden, n_heads, 2.0, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 2 * token_dim)

    def token_slices(self) -> dict[str, slice]:
        """Positions of each modality's tokens in the sequence."""
        out, start = {}, 0
        for m, (_, t) in self.sizes.items():
            out[m] = slice(start, start + t)
            start += t
        return out

    def features(
        self, inputs: dict[str, torch.Tensor], shown: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Hidden states ``(B, n_tokens, hidden)``; ``shown[m]`` ``(B,)`` is False where
        modality ``m`` is masked."""
        b = inputs["rna"].shape[0]
        blocks = []
        for m, (_, t) in self.sizes.items():
            proj = self.gene_to_tokens if m == "rna" else self.mod_to_tokens[m]
            h = proj(self.drop(inputs[m])).view(b, t, self.hidden)
            mask = self.mask_tokens[m].to(h.dtype).expand(b, -1, -1)
            blocks.append(torch.where(shown[m].view(-1, 1, 1), h, mask))
        h = torch.cat(blocks, 1) + self.modality_embed(self.modality_ids) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward(
        self, inputs: dict[str, torch.Tensor], shown: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_var = self.head(self.features(inputs, shown)).chunk(2, dim=-1)
        return mean, F.softplus(raw_var) + self.var_eps


class MultimodalTokenDecoder(TokenDecoder):
    """:class:`~scfm_adapt.nn.TokenDecoder` for RNA plus one head per extra modality.

    All heads read the same hidden layer of all tokens. ``extra`` maps each extra modality
    to ``(n_features, likelihood)``: ``"mixture"`` (3 outputs per protein: log background
    rate, foreground log-excess, background logit), ``"nb"`` (log rate) or ``"poisson"``
    (expression fractions, scaled by the cell's library of that modality, which gets its own
    library model).
    """

    def __init__(self, *args, extra: dict[str, tuple[int, str]], **kwargs):
        super().__init__(*args, **kwargs)
        hidden = self.scale_head.in_features
        self.extra = dict(extra)
        self.mod_heads = nn.ModuleDict(
            {m: nn.Linear(hidden, f * HEAD_WIDTH[lik]) for m, (f, lik) in self.extra.items()}
        )
        lib_hidden = self.lib_out.in_features
        self.mod_lib_out = nn.ModuleDict(
            {m: nn.Linear(lib_hidden, 2) for m, (_, lik) in self.extra.items() if lik == "poisson"}
        )

    def modality_outputs(
        self, z: torch.Tensor, covariates: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Raw head outputs ``(B, n_features, width)`` of every extra modality."""
        h = self.hidden_state(z, covariates)
        return {
            m: self.mod_heads[m](h).float().view(h.shape[0], f, HEAD_WIDTH[lik])
            for m, (f, lik) in self.extra.items()
        }

    def modality_library(
        self, name: str, z: torch.Tensor, covariates: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of modality ``name``'s log library, each ``(B, 1)``."""
        return self._library_params(self.mod_lib_out[name], self.library_hidden(z, covariates))

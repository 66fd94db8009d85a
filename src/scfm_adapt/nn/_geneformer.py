"""A Geneformer-style BERT as a cell encoder with the interface of :class:`TokenEncoder`.

The BERT's parts are kept as ``embeddings`` and ``blocks.i.layer`` (each ``BertLayer``
wrapped in a :class:`BertBlock`), so the project's adaptation machinery finds them by
module name: LoRA targets the ``layer.*`` linear maps of ``encoder.blocks.i``, partial
unfreezing counts ``encoder.blocks.i``, and bottleneck adapters sit in every block. Learned
queries pool the gene-token states into ``n_tokens`` tokens, and a head gives the posterior
mean and variance of each token, exactly like :class:`~scfm_adapt.nn.TokenEncoder`.

Geneformer reads a cell as a *rank value encoding*: its expressed genes sorted by
normalised expression divided by each gene's corpus median, truncated to the model's input
size. :meth:`GeneformerEncoder.tokenize` builds that sequence on the device from the
project's normalised input ``log1p(counts / library * 1e4)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import CheckpointError
from ._bottleneck_adapter import AdapterHost
from ._external_backbone import ExternalBackboneEncoder, copy_strict, top_genes

# Buffers of BertEmbeddings that old transformers saved but that are rebuilt, not loaded.
_IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


class BertBlock(AdapterHost):
    """One ``transformers`` ``BertLayer`` with bottleneck adapters in Houlsby positions.

    The layer's forward is re-implemented from its submodules (post-LayerNorm BERT), so
    that an adapter acts on the output of ``layer.attention.output.dense`` and of
    ``layer.output.dense`` before each residual sum. Calling the submodules by name, rather
    than hooking them, keeps the adapters working after peft replaces those linear maps
    with LoRA wrappers of the same name.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
            raise ValueError("BertBlock wraps encoder layers only (no cross-attention).")
        self.layer = layer
        self._init_adapters(layer.attention.output.dense.out_features)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``h`` ``(B, L, H)``; ``attention_mask`` ``(B, L)`` bool, ``True`` for the tokens
        attended to (Hugging Face's convention, the opposite of a key padding mask)."""
        layer = self.layer
        mask = attention_mask[:, None, None, :]  # (B, 1, 1, L): same mask for all queries
        a, _ = layer.attention.self(h, attention_mask=mask)  # (B, L, H)
        out = layer.attention.output
        a = self._adapt("attn", out.dropout(out.dense(a)))
        h = out.LayerNorm(a + h)
        ffn = layer.output
        m = ffn.dropout(ffn.dense(layer.intermediate(h)))  # (B, L, I) → (B, L, H)
        return ffn.LayerNorm(self._adapt("mlp", m) + h)


class GeneformerEncoder(ExternalBackboneEncoder):
    """Geneformer-style BERT → ``n_tokens`` latent tokens (mean and variance).

    Drop-in for :class:`~scfm_adapt.nn.TokenEncoder`: :meth:`forward` maps normalised
    expression ``log1p(counts / library * 1e4)`` ``(B, G)`` to a posterior mean and variance,
    each ``(B, n_tokens, token_dim)``. The BERT weights start random; load pretrained ones
    with :meth:`load_backbone_state`.

    Parameters
    ----------
    bert_config
        The checkpoint's ``config.json`` (a ``BertConfig`` as a dictionary).
    gene_token_ids
        Token id of each input gene, length ``G``; ``-1`` for genes outside the vocabulary
        (see :func:`~scfm_adapt.data.map_genes_to_vocab`).
    n_tokens, token_dim
        Number and size of the latent tokens.
    pad_id, cls_id, eos_id
        Special token ids; ``<cls>`` is put first and ``<eos>`` after the last gene when
        given (Geneformer V2 uses both, V1 neither).
    max_len
        Genes per cell; default ``max_position_embeddings`` minus the special tokens.
    dropout
        Dropout on the BERT states before pooling (the BERT keeps the dropout of its
        configuration).
    var_eps
        Floor of the posterior variance.
    """

    lora_targets = (
        "layer.attention.self.query",
        "layer.attention.self.key",
        "layer.attention.self.value",
        "layer.attention.output.dense",
        "layer.intermediate.dense",
        "layer.output.dense",
    )
    # Parts whose weights come from the checkpoint (frozen by default by the caller).
    pretrained_prefixes = ("embeddings.", "blocks.")

    def __init__(
        self,
        bert_config: dict,
        gene_token_ids: Sequence[int] | torch.Tensor,
        n_tokens: int = 8,
        token_dim: int = 16,
        *,
        pad_id: int = 0,
        cls_id: int | None = None,
        eos_id: int | None = None,
        max_len: int | None = None,
        dropout: float = 0.0,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert_config = dict(bert_config)
        # SDPA takes the boolean mask built here as is (eager attention would need an
        # additive one) and has a fused CPU kernel.
        config = BertConfig.from_dict(self.bert_config, attn_implementation="sdpa")
        if config.is_decoder or config.add_cross_attention:
            raise CheckpointError("A decoder BERT (is_decoder=True) is not a cell encoder.")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"position_embedding_type={config.position_embedding_type!r} is not supported."
            )
        bert = BertModel(config, add_pooling_layer=False)
        # Keep the parts only: each parameter then has one name, and the block structure
        # is what LoRA targets and partial unfreezing match on.
        self.embeddings = bert.embeddings
        self.blocks = nn.ModuleList(BertBlock(layer) for layer in bert.encoder.layer)

        self._set_gene_token_ids(gene_token_ids, config.vocab_size)
        n_special = (cls_id is not None) + (eos_id is not None)
        limit = config.max_position_embeddings - n_special
        max_len = limit if max_len is None else int(max_len)
        if not 1 <= max_len <= limit:
            raise ValueError(
                f"max_len={max_len}: the model reads at most {limit} genes "
                f"(max_position_embeddings={config.max_position_embeddings}, "
                f"{n_special} special tokens)."
            )
        self.pad_id, self.cls_id, self.eos_id, self.max_len = pad_id, cls_id, eos_id, max_len
        self.register_buffer("gene_median", torch.ones(self.n_genes))

        self._init_readout(
            config.hidden_size, n_tokens, token_dim, config.num_attention_heads, dropout, var_eps
        )

    # ------------------------------------------------------------------ tokens
    @torch.no_grad()
    def set_gene_medians(self, values: Sequence[float] | torch.Tensor) -> None:
        """Set each input gene's median normalised expression (Geneformer's
        ``gene_median_dictionary``), length ``G``, all positive and finite; use ``1`` for
        genes without a median (or outside the vocabulary)."""
        v = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if v.shape[0] != self.n_genes:
            raise ValueError(f"Got {v.shape[0]} medians for {self.n_genes} genes.")
        if not (torch.isfinite(v) & (v > 0)).all():
            raise ValueError(
                "Gene medians must be positive and finite; use 1.0 for genes without one."
            )
        self.gene_median.copy_(v)

    @torch.no_grad()
    def tokenize(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank value encoding of each cell.

        Genes outside the vocabulary or not expressed are dropped; the rest are sorted by
        ``expm1(x_norm) / gene_median``, descending, ties broken by gene index (lower
        first), and the first ``max_len`` are kept.

        Parameters
        ----------
        x_norm
            ``log1p(counts / library * 1e4)``, ``(B, G)``.

        Returns
        -------
        input_ids
            ``(B, L)`` long, padded with ``pad_id``; ``L`` is the longest sequence of the
            batch (at least 1).
        attention_mask
            ``(B, L)`` bool, ``True`` for real tokens (all ``False`` for a cell without
            an expressed gene in the vocabulary and no special tokens).
        """
        expr = torch.expm1(x_norm.float())  # (B, G): counts per 10k, Geneformer's scale
        valid = (expr > 0) & (self.gene_token_ids >= 0)  # (B, G)
        score = torch.where(valid, expr / self.gene_median, float("-inf"))
        order, mask, n = top_genes(score, valid, self.max_len)  # (B, k), (B, k), (B,)
        ids = torch.where(mask, self.gene_token_ids[order], self.pad_id)  # (B, k)
        b = ids.shape[0]
        if self.cls_id is not None:
            ids = torch.cat([ids.new_full((b, 1), self.cls_id), ids], 1)  # (B, k + 1)
            mask = torch.cat([mask.new_ones(b, 1), mask], 1)
            n = n + 1
        if self.eos_id is not None:  # right after each cell's last gene, before the padding
            ids = torch.cat([ids, ids.new_full((b, 1), self.pad_id)], 1)  # (B, L)
            ids.scatter_(1, n[:, None], self.eos_id)
            n = n + 1
            mask = torch.arange(ids.shape[1], device=ids.device) < n[:, None]
        if ids.shape[1] == 0:  # no cell has a token: one padding position keeps shapes valid
            ids = ids.new_full((b, 1), self.pad_id)
            mask = mask.new_zeros(b, 1)
        return ids, mask

    # ------------------------------------------------------------------ forward
    def token_states(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BERT hidden states of each cell's gene tokens, for inspection and attribution.

        Returns
        -------
        states
            ``(B, L, hidden)`` last hidden states.
        input_ids, attention_mask
            As from :meth:`tokenize`.
        """
        ids, mask = self.tokenize(x_norm)
        h = self.embeddings(input_ids=ids)  # (B, L, H)
        attend = self._attend(mask)
        for block in self.blocks:
            h = block(h, attend)  # (B, L, H)
        return h, ids, mask

    @staticmethod
    def _attend(mask: torch.Tensor) -> torch.Tensor:
        # A cell without any token would attend to nothing, and a softmax over no keys is
        # NaN; let such a cell attend to its padding instead (a fixed "empty cell" state).
        return mask | ~mask.any(1, keepdim=True)

    def features(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised states ``(B, n_tokens, hidden)``."""
        h, _, mask = self.token_states(x_norm)
        return self.norm(self.pool(self.drop(h), self._attend(mask)))  # (B, T, H)

    # ------------------------------------------------------------------ weights
    def _backbone_tensors(self) -> dict[str, torch.Tensor]:
        """Backbone parameters under their ``BertModel`` names (peft's ``base_layer`` removed,
        LoRA weights left out)."""
        out = {f"embeddings.{k}": v for k, v in self.embeddings.state_dict(keep_vars=True).items()}
        for i, block in enumerate(self.blocks):
            for k, v in block.layer.state_dict(keep_vars=True).items():
                if "lora_" not in k:
                    out[f"encoder.layer.{i}.{k.replace('.base_layer', '')}"] = v
        return out

    @torch.no_grad()
    def load_backbone_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a ``transformers.BertModel`` state dict (as from
        :func:`~scfm_adapt.data.load_geneformer`) into ``embeddings`` and ``blocks``.

        Strict: every backbone weight must be given with its shape, and nothing else
        (pooler weights and the ``position_ids`` / ``token_type_ids`` buffers are ignored).

        Raises
        ------
        CheckpointError
            Missing, unexpected or mis-shaped keys.
        """
        given = {
            k: v
            for k, v in state_dict.items()
            if not k.startswith("pooler.") and k not in _IGNORED_KEYS
        }
        copy_strict(
            self._backbone_tensors(),
            given,
            "Build the encoder from the same checkpoint's config.json, and pass a BertModel "
            "state dict (load_geneformer strips the 'bert.' prefix).",
        )


__all__ = ["BertBlock", "GeneformerEncoder"]

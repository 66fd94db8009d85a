"""scGPT's transformer as a cell encoder with the interface of :class:`TokenEncoder`.

scGPT reads a cell as a set of tokens, one per expressed gene in its vocabulary plus a
``<cls>`` token first. A token's embedding is the sum of a gene embedding (an embedding
table, then LayerNorm) and a value embedding of the gene's expression (by default its
per-cell quantile bin through a small MLP, then LayerNorm); a transformer encoder without
positional embeddings (the tokens are a set) maps them to states, and scGPT's cell
embedding is the ``<cls>`` state.

Here learned queries pool every state, the ``<cls>`` state among them, into ``n_tokens``
latent tokens, and a head gives their posterior mean and variance, exactly like
:class:`~scfm_adapt.nn.TokenEncoder`. The parts keep scGPT's names under ``gene_encoder``,
``value_encoder`` and ``blocks.<i>`` (its ``transformer_encoder.layers.<i>``), so LoRA
targets ``self_attn.Wqkv``, ``self_attn.out_proj``, ``linear1`` and ``linear2`` of each
block, partial unfreezing counts blocks, and bottleneck adapters sit in every block.
Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention`, which picks
a fused kernel on a GPU (memory-efficient with padding, flash also without), so flash-attn is
not needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ._bottleneck_adapter import AdapterHost
from ._external_backbone import ExternalBackboneEncoder, copy_strict, top_genes

#: scGPT clamps values at this before its continuous value encoder.
MAX_VALUE = 512.0
TIE_BREAKS = ("middle", "random")


def _lerp_numpy(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``a + (b - a) * t`` as numpy's quantile computes it (from ``b`` when ``t >= 0.5``),
    so that an edge equals a data value exactly where numpy's does."""
    d = b - a
    return torch.where(t >= 0.5, b - d * (1 - t), a + d * t)


def bin_values(
    values: torch.Tensor,
    valid: torch.Tensor,
    n_bins: int,
    tie_break: str = "middle",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """scGPT's per-cell value binning, on the device.

    For each cell, the edges are the ``n_bins - 1`` evenly spaced quantiles (linear
    interpolation) of its valid values; a value's bin is the number of edges at or below
    it, so valid values fall in bins ``1 .. n_bins - 1`` and everything else in bin 0.
    Where several edges are equal (common for counts: many genes with one read), a value
    on them could take any bin from one past the edges below it to the count at or below
    it. scGPT draws one uniformly (``tie_break="random"``); ``"middle"`` takes the middle
    of that range (the lower one of two), so that a cell always gets the same tokens.
    Without equal edges both give scGPT's bin.

    Parameters
    ----------
    values
        ``(B, G)`` expression (any per-cell monotone scale gives the same bins).
    valid
        ``(B, G)`` bool: the values to bin (expressed genes in the vocabulary).
    n_bins
        scGPT's ``n_bins`` (51 for its released models).
    tie_break
        ``"middle"`` or ``"random"``.
    generator
        Random numbers of ``tie_break="random"`` (on the device of ``values``).

    Returns
    -------
    ``(B, G)`` float bins.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break={tie_break!r}; choose one of {TIE_BREAKS}.")
    if n_bins < 3:
        raise ValueError(f"n_bins={n_bins}: scGPT's binning needs at least 3 bins.")
    x = values.double()
    n = valid.sum(1)  # (B,)
    s = torch.sort(torch.where(valid, x, float("inf")), dim=1).values  # valid values first
    # numpy's linspace, to the last bit (torch's differs by an ulp here and there, and an
    # edge that should sit exactly on a value would then miss it).
    q = torch.arange(n_bins - 1, dtype=torch.float64, device=x.device) * (1.0 / (n_bins - 2))
    q[-1] = 1.0  # (E,)
    pos = q[None, :] * (n - 1).clamp(min=0)[:, None]  # (B, E) fractional rank
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=(n - 1).clamp(min=0)[:, None])
    a, b = s.gather(1, lo), s.gather(1, hi)
    edges = _lerp_numpy(a, b, pos - lo)  # (B, E), non-decreasing
    edges = torch.where(torch.isfinite(edges), edges, 0.0).contiguous()
    probe = torch.where(valid, x, 0.0).contiguous()
    at_or_below = torch.searchsorted(edges, probe, right=True)  # numpy's digitize
    below = torch.searchsorted(edges, probe, right=False)  # digitize(right=True)
    if tie_break == "middle":
        digits = (below + 1 + at_or_below) // 2
    else:
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
        digits = torch.ceil(at_or_below - u * (at_or_below - below)).long()
    return torch.where(valid, digits, 0).to(values.dtype)


class EmbeddingNorm(nn.Module):
    """scGPT's table lookup, then LayerNorm: its gene embedding (``encoder``) and its value
    embedding of bin indices (``input_emb_style="category"``)."""

    def __init__(self, n_rows: int, dim: int, padding_idx: int | None):
        super().__init__()
        self.embedding = nn.Embedding(n_rows, dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(idx.long()))


class ContinuousValueEncoder(nn.Module):
    """scGPT's value embedding of a number: clamp, ``Linear(1, d)``, ReLU, ``Linear(d, d)``,
    LayerNorm, dropout."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(1, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.linear1(v.unsqueeze(-1).clamp(max=MAX_VALUE)))  # (B, L, d)
        return self.dropout(self.norm(self.linear2(h)))


class ScGPTAttention(nn.Module):
    """Multi-head self-attention with scGPT's parameter names: one packed ``Wqkv`` map
    (queries, keys, values stacked, each split into heads) and ``out_proj``."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.p = n_heads, dropout
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        """``h`` ``(B, L, d)``; ``attend`` ``(B, L)`` bool, ``True`` for the keys attended to
        (``None``: all)."""
        b, n, d = h.shape
        qkv = self.Wqkv(h).view(b, n, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, d_head)
        mask = None if attend is None else attend[:, None, None, :]
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0
        )  # (B, heads, L, d_head)
        return self.out_proj(a.transpose(1, 2).reshape(b, n, d))


class ScGPTBlock(AdapterHost):
    """One layer of scGPT's transformer (ReLU feed-forward, LayerNorm eps 1e-5), with
    bottleneck adapters on the attention and feed-forward outputs before each residual sum.

    ``pre_norm=False`` is torch's post-norm encoder layer (scGPT's default and its
    released models); ``pre_norm=True`` is scGPT's own pre-norm variant, in which each
    residual branch starts from the normalised states.
    """

    def __init__(self, dim: int, n_heads: int, d_hid: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = ScGPTAttention(dim, n_heads, dropout)
        self.linear1 = nn.Linear(dim, d_hid)
        self.linear2 = nn.Linear(d_hid, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        self._init_adapters(dim)

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(h))))  # (B, L, d)

    def forward(self, h: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            h = self.norm1(h)
            h = h + self.dropout1(self._adapt("attn", self.self_attn(h, attend)))
            h = self.norm2(h)
            return h + self.dropout2(self._adapt("mlp", self._ffn(h)))
        h = self.norm1(h + self.dropout1(self._adapt("attn", self.self_attn(h, attend))))
        return self.norm2(h + self.dropout2(self._adapt("mlp", self._ffn(h))))


class ScGPTEncoder(ExternalBackboneEncoder):
    """scGPT's transformer → ``n_tokens`` latent tokens (mean and variance).

    Drop-in for :class:`~scfm_adapt.nn.TokenEncoder`: :meth:`forward` maps normalised
    expression ``log1p(counts / library * 1e4)`` ``(B, G)`` to a posterior mean and variance,
    each ``(B, n_tokens, token_dim)``. The transformer's weights start random; load
    pretrained ones with :meth:`load_backbone_state`.

    Parameters
    ----------
    config
        The checkpoint's settings (:func:`~scfm_adapt.data.scgpt_config`).
    gene_token_ids
        Token id of each input gene, length ``G``; ``-1`` for genes outside the vocabulary.
    n_tokens, token_dim
        Number and size of the latent tokens.
    pad_id, cls_id
        Token ids of ``<pad>`` and ``<cls>``.
    max_len
        Genes per cell (the ``<cls>`` token comes on top); default ``max_seq_len - 1``.
        A cell with more expressed genes keeps its most expressed ones (scGPT samples
        them at random).
    cls_value
        Value of the ``<cls>`` token; default ``pad_value``, as scGPT's pretraining and its
        ``embed_data`` use.
    tie_break
        How a value on equal bin edges is binned (:func:`bin_values`).
    dropout
        Dropout on the states before pooling (the transformer keeps the dropout of its
        ``args.json``).
    var_eps
        Floor of the posterior variance.
    """

    lora_targets = ("self_attn.Wqkv", "self_attn.out_proj", "linear1", "linear2")
    # Parts whose weights come from the checkpoint (frozen by default by the caller).
    pretrained_prefixes = ("gene_encoder.", "value_encoder.", "blocks.")

    def __init__(
        self,
        config: dict,
        gene_token_ids: Sequence[int] | torch.Tensor,
        n_tokens: int = 8,
        token_dim: int = 16,
        *,
        pad_id: int,
        cls_id: int,
        max_len: int | None = None,
        cls_value: float | None = None,
        tie_break: str = "middle",
        dropout: float = 0.0,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        c = self.config = dict(config)
        d, vocab_size = int(c["d_model"]), int(c["vocab_size"])
        self._set_gene_token_ids(gene_token_ids, vocab_size)
        limit = int(c["max_seq_len"]) - 1
        max_len = limit if max_len is None else int(max_len)
        if not 1 <= max_len <= limit:
            raise ValueError(
                f"max_len={max_len}: the model reads at most {limit} genes "
                f"(max_seq_len={c['max_seq_len']}, one <cls> token)."
            )
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break={tie_break!r}; choose one of {TIE_BREAKS}.")
        self.pad_id, self.cls_id, self.max_len, self.tie_break = pad_id, cls_id, max_len, tie_break
        self.pad_value = float(c["pad_value"])
        self.cls_value = self.pad_value if cls_value is None else float(cls_value)
        self.input_style, self.emb_style = c["input_style"], c["input_emb_style"]

        p = float(c["dropout"])
        self.gene_encoder = EmbeddingNorm(vocab_size, d, pad_id)
        if self.emb_style == "continuous":
            self.value_encoder: nn.Module = ContinuousValueEncoder(d, p)
        elif self.emb_style == "category":
            n_in = int(c["n_input_bins"])
            for name, v in (("pad_value", self.pad_value), ("cls_value", self.cls_value)):
                if not (v == int(v) and 0 <= v < n_in):
                    raise CheckpointError(
                        f"{name}={v} is not a row of the value embedding table "
                        f"(n_input_bins={n_in}); category values index that table, so "
                        f"{name} must be an integer in 0..{n_in - 1}."
                    )
            if int(c["n_bins"]) > n_in:
                raise CheckpointError(
                    f"n_bins={c['n_bins']} bins do not fit the value embedding table of "
                    f"{n_in} rows; the args.json belongs to another model."
                )
            self.value_encoder = EmbeddingNorm(n_in, d, int(self.pad_value))
        else:  # "scaling": the gene embedding times the value
            self.value_encoder = nn.Identity()
        self.blocks = nn.ModuleList(
            ScGPTBlock(d, int(c["n_heads"]), int(c["d_hid"]), p, bool(c["pre_norm"]))
            for _ in range(int(c["n_layers"]))
        )
        self._init_readout(d, n_tokens, token_dim, int(c["n_heads"]), dropout, var_eps)

    # ------------------------------------------------------------------ tokens
    @torch.no_grad()
    def tokenize(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """scGPT's input of each cell: ``<cls>``, then its expressed genes in the
        vocabulary with their values.

        Values follow ``input_style``: ``"binned"`` (per-cell quantile bins over the cell's
        expressed vocabulary genes, :func:`bin_values`), ``"log1p"`` or ``"normed_raw"``
        (counts per 10k over the vocabulary genes, with or without log1p, as scGPT's
        preprocessing computes them after keeping those genes). A cell with more than
        ``max_len`` such genes keeps the most expressed (ties: lower gene index first);
        the genes keep their data order, which scGPT's transformer does not see.

        Parameters
        ----------
        x_norm
            ``log1p(counts / library * 1e4)``, ``(B, G)``.

        Returns
        -------
        input_ids, values
            ``(B, L)`` token ids (``pad_id`` after each cell's genes) and values
            (``pad_value`` there); ``L`` is one more than the most genes of a cell.
        attention_mask
            ``(B, L)`` bool, ``True`` for real tokens (the ``<cls>`` token always).
        """
        valid = (x_norm > 0) & (self.gene_token_ids >= 0)  # (B, G) expressed, in the vocab
        if self.input_style == "binned":  # bins depend on each cell's order only
            vals = bin_values(x_norm, valid, int(self.config["n_bins"]), self.tie_break)
            vals = vals.float()
        else:
            kept = torch.where(valid, torch.expm1(x_norm.float()), 0.0)  # counts per 10k
            vals = kept / kept.sum(1, keepdim=True).clamp(min=1e-12) * 1e4
            vals = torch.log1p(vals) if self.input_style == "log1p" else vals
        score = torch.where(valid, x_norm.float(), float("-inf"))
        top, mask, _ = top_genes(score, valid, self.max_len)  # (B, k)
        # The kept genes in data order, then the padding (index G sorts last).
        order = torch.sort(torch.where(mask, top, self.n_genes), dim=1).values
        safe = order.clamp(max=self.n_genes - 1)
        ids = torch.where(mask, self.gene_token_ids[safe], self.pad_id)
        values = torch.where(mask, vals.gather(1, safe), self.pad_value)
        b = ids.shape[0]
        ids = torch.cat([ids.new_full((b, 1), self.cls_id), ids], 1)  # (B, k + 1)
        values = torch.cat([values.new_full((b, 1), self.cls_value), values], 1)
        mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        return ids, values, mask

    # ------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, L, d)``: gene embedding plus (or, ``"scaling"``, times)
        value embedding."""
        genes = self.gene_encoder(ids)
        if self.emb_style == "scaling":
            return genes * values.unsqueeze(-1)
        return genes + self.value_encoder(values)

    def encode(
        self, ids: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """scGPT's ``_encode``: the transformer's last states ``(B, L, d)`` of given tokens."""
        h = self.embed(ids, values)
        # Without padding, no mask: the fused attention kernels then include flash
        # attention, which takes no mask (one host sync per forward).
        attend = None if bool(attention_mask.all()) else attention_mask
        for block in self.blocks:
            h = block(h, attend)
        return h

    def token_states(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Last states ``(B, L, d)`` of each cell's tokens (``<cls>`` first), its token ids
        and attention mask, for inspection and attribution."""
        ids, values, mask = self.tokenize(x_norm)
        return self.encode(ids, values, mask), ids, mask

    def cell_embedding(self, x_norm: torch.Tensor) -> torch.Tensor:
        """scGPT's own cell embedding: the ``<cls>`` state, L2-normalised, ``(B, d)``."""
        return F.normalize(self.token_states(x_norm)[0][:, 0], dim=-1)

    def features(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised states ``(B, n_tokens, d)``."""
        h, _, mask = self.token_states(x_norm)
        return self.norm(self.pool(self.drop(h), mask))  # (B, T, d)

    # ------------------------------------------------------------------ weights
    def _backbone_tensors(self) -> dict[str, torch.Tensor]:
        """Backbone parameters under scGPT's names (peft's ``base_layer`` removed, LoRA
        and adapter weights left out)."""
        out = {}
        for prefix, part in (
            ("encoder.", self.gene_encoder),
            ("value_encoder.", self.value_encoder),
        ):
            out |= {f"{prefix}{k}": v for k, v in part.state_dict(keep_vars=True).items()}
        for i, block in enumerate(self.blocks):
            for k, v in block.state_dict(keep_vars=True).items():
                if "lora_" not in k and not k.startswith("adapters."):
                    name = k.replace(".base_layer", "")
                    out[f"transformer_encoder.layers.{i}.{name}"] = v
        return out

    @torch.no_grad()
    def load_backbone_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load scGPT's backbone tensors (as from :func:`~scfm_adapt.data.load_scgpt`) into
        ``gene_encoder``, ``value_encoder`` and ``blocks``.

        Strict: every backbone tensor must be given with its shape, and nothing else.

        Raises
        ------
        CheckpointError
            Missing, unexpected or mis-shaped keys.
        """
        copy_strict(
            self._backbone_tensors(),
            state_dict,
            "Build the encoder from the same checkpoint (load_scgpt reads args.json and the "
            "weights together).",
        )


__all__ = ["ScGPTBlock", "ScGPTEncoder", "bin_values"]

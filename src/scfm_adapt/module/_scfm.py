"""The SCFM module: a token VAE over counts (stage 1) and a DiT prior over its tokens (stage 2).

Both stages follow scvi-tools' protocol ``inference → generative → loss``:

* ``stage="vae"``: inference encodes counts into posterior tokens and samples them;
  generative decodes the tokens into a count distribution; the loss is the negative ELBO.
* ``stage="prior"``: inference encodes (the VAE is frozen); generative noises the tokens
  and denoises them with the DiT; the loss is the denoising error.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal, Poisson
from torch.distributions import kl_divergence as kl

from ..diffusion import NoiseSchedule, ddim_invert, ddim_sample
from ..nn import DiT, PathwayTokenEncoder, RankTokenEncoder, TokenDecoder, TokenEncoder
from ._adapters import AdaptableMixin
from ._keys import MODULE_KEYS as K
from ._likelihood import GeneNegativeBinomial

Stage = Literal["vae", "prior"]
LIKELIHOODS = ("nb", "zinb", "poisson")
DISPERSIONS = ("gene", "gene-batch")
PRIOR_TARGETS = ("sample", "mean")
TOKENIZERS = ("latent", "pathway", "rank", "geneformer", "scgpt")
#: Default width of the latent tokenizer's factorised gene map (``encoder_rank``).
ENCODER_RANK = 128


def make_encoder(
    tokenizer: str,
    options: dict | None,
    n_input: int,
    n_tokens: int,
    token_dim: int,
    hidden: int,
    depth: int,
    n_heads: int,
    dropout: float,
    rank: int | None = None,
) -> nn.Module:
    """The stage-1 encoder for ``tokenizer`` (shapes only; data-derived buffers such as
    gene-set memberships, graphs and medians are filled by the model or the state dict).

    ``options`` (JSON): ``pathway``: ``n_sets``, ``n_members``, ``n_channels``, ``n_edges``,
    ``sparse_threshold``, ``per_set_inputs``;
    ``rank``: ``top_k``, ``n_edges``; ``geneformer``: ``bert_config``, ``gene_token_ids``,
    ``pad_id``, ``cls_id``, ``eos_id``, ``max_len``; ``scgpt``: ``config``,
    ``gene_token_ids``, ``pad_id``, ``cls_id``, ``max_len``, ``cls_value``, ``tie_break``.
    ``rank`` factorises the latent
    tokenizer's gene map (:class:`~scfm_adapt.nn.TokenEncoder`); the others read genes
    their own way and ignore it.
    """
    o = dict(options or {})
    if tokenizer == "latent":
        return TokenEncoder(
            n_input, n_tokens, token_dim, hidden, depth, n_heads, dropout, rank=rank
        )
    if tokenizer == "pathway":
        return PathwayTokenEncoder(
            n_input,
            int(o["n_sets"]),
            int(o["n_members"]),
            n_tokens,
            token_dim,
            hidden,
            depth,
            n_heads,
            dropout,
            n_channels=int(o.get("n_channels", 4)),
            n_edges=int(o.get("n_edges", 0)),
            sparse_threshold=float(o.get("sparse_threshold", 0.0)),
            # models saved before the option share one input map
            per_set_inputs=bool(o.get("per_set_inputs", False)),
        )
    if tokenizer == "rank":
        return RankTokenEncoder(
            n_input,
            n_tokens,
            token_dim,
            hidden,
            depth,
            n_heads,
            dropout,
            top_k=int(o.get("top_k", 64)),
            n_edges=int(o.get("n_edges", 0)),
        )
    if tokenizer == "geneformer":
        from ..nn._geneformer import GeneformerEncoder

        return GeneformerEncoder(
            o["bert_config"],
            o["gene_token_ids"],
            n_tokens,
            token_dim,
            pad_id=o.get("pad_id", 0),
            cls_id=o.get("cls_id"),
            eos_id=o.get("eos_id"),
            max_len=o.get("max_len"),
            dropout=dropout,
        )
    if tokenizer == "scgpt":
        from ..nn._scgpt import ScGPTEncoder

        return ScGPTEncoder(
            o["config"],
            o["gene_token_ids"],
            n_tokens,
            token_dim,
            pad_id=o["pad_id"],
            cls_id=o["cls_id"],
            max_len=o.get("max_len"),
            cls_value=o.get("cls_value"),
            tie_break=o.get("tie_break", "middle"),
            dropout=dropout,
        )
    raise ValueError(f"tokenizer={tokenizer!r}; choose one of {TOKENIZERS}.")


class SCFMModule(AdaptableMixin, BaseModuleClass):
    """Latent-token VAE plus a conditional Diffusion Transformer prior.

    Named adapters (LoRA, bottleneck adapters, partial or full unfreezing, linear probe)
    come from :class:`~scfm_adapt.module.AdaptableMixin`; new batch or covariate categories
    from :meth:`extend_categories`; genes absent from a query data set are masked with
    :meth:`set_gene_mask`.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch, n_labels
        Number of batches and labels (1 when not registered).
    n_cats_per_cov
        Number of categories of each extra categorical covariate.
    n_continuous_cov
        Number of continuous covariates.
    n_tokens, token_dim
        Shape ``(n_tokens, token_dim)`` of one cell's latent.
    encoder_hidden, encoder_depth, n_heads
        Width and depth of the encoder transformer over tokens.
    decoder_hidden
        Hidden width of the decoder.
    gene_likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` or ``"gene-batch"``.
    dit_hidden, dit_depth, dit_heads, dit_mlp_ratio
        Size of the DiT prior (the defaults keep stage 2 about as fast as stage 1 on a CPU).
    p_uncond
        Probability of dropping each condition while training the prior (classifier-free
        guidance).
    n_diffusion_steps, prediction
        The noise schedule (parameter-free, see :class:`~scfm_adapt.diffusion.NoiseSchedule`).
    prior_target
        What the DiT learns: ``"sample"`` (posterior samples of the tokens) or ``"mean"``
        (their posterior means, free of the encoder's noise).
    ema_decay
        Decay of the exponential moving average of the DiT weights used for sampling.
    dropout
        Dropout in the encoder.
    tokenizer, tokenizer_options
        How the encoder reads a cell: ``"latent"`` (a linear map of all genes to tokens),
        ``"pathway"`` (one token per gene set), ``"rank"`` (top-k genes as gene-id
        tokens), ``"geneformer"`` (an external BERT) or ``"scgpt"`` (scGPT's transformer);
        see :func:`make_encoder`.
    encoder_rank
        Width of the factorised gene map of the latent tokenizer (genes → ``encoder_rank``
        → tokens), ``None`` for one full map. The full map is the encoder's largest matmul;
        128 matches the first layer of scVI's encoder (``benchmarks/throughput.py``
        measures the cost, ``benchmarks/embedding.py`` the quality).
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_cats_per_cov: list[int] | None = None,
        n_continuous_cov: int = 0,
        n_tokens: int = 8,
        token_dim: int = 16,
        encoder_hidden: int = 64,
        encoder_depth: int = 2,
        n_heads: int = 4,
        decoder_hidden: int = 256,
        gene_likelihood: str = "nb",
        dispersion: str = "gene",
        dit_hidden: int = 128,
        dit_depth: int = 3,
        dit_heads: int = 4,
        dit_mlp_ratio: float = 2.0,
        p_uncond: float = 0.1,
        n_diffusion_steps: int = 1000,
        prediction: str = "eps",
        prior_target: str = "sample",
        ema_decay: float = 0.999,
        dropout: float = 0.1,
        tokenizer: str = "latent",
        tokenizer_options: dict | None = None,
        encoder_rank: int | None = ENCODER_RANK,
    ):
        super().__init__()
        # Constructor arguments, to rebuild this module from a checkpoint (see ``rebuild``).
        self.hparams_ = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if gene_likelihood not in LIKELIHOODS:
            raise ValueError(f"gene_likelihood={gene_likelihood!r}; choose one of {LIKELIHOODS}.")
        if dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion={dispersion!r}; choose one of {DISPERSIONS}.")
        self.n_input, self.n_batch, self.n_labels = n_input, n_batch, n_labels
        self.n_cats_per_cov = list(n_cats_per_cov or [])
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.gene_likelihood, self.dispersion = gene_likelihood, dispersion
        self.ema_decay = ema_decay
        if prior_target not in PRIOR_TARGETS:
            raise ValueError(f"prior_target={prior_target!r}; choose one of {PRIOR_TARGETS}.")
        self.prior_target = prior_target
        self.stage: Stage = "vae"
        self.schedule = NoiseSchedule(n_diffusion_steps, "cosine", prediction)

        self.tokenizer = tokenizer
        self.encoder = make_encoder(
            tokenizer,
            tokenizer_options,
            n_input,
            n_tokens,
            token_dim,
            encoder_hidden,
            encoder_depth,
            n_heads,
            dropout,
            rank=encoder_rank,
        )
        self.decoder = TokenDecoder(
            n_input,
            n_tokens,
            token_dim,
            decoder_hidden,
            categorical_sizes=[n_batch, *self.n_cats_per_cov],
            zero_inflation=gene_likelihood == "zinb",
        )
        n_r = n_batch if dispersion == "gene-batch" else 1
        self.px_r = nn.Parameter(torch.randn(n_input, n_r) * 0.1)

        # Conditions of the prior: every registered covariate with more than one value.
        cond_sizes = {"batch": n_batch, "labels": n_labels}
        cond_sizes.update({f"cat_cov_{i}": n for i, n in enumerate(self.n_cats_per_cov)})
        cond_sizes = {k: n for k, n in cond_sizes.items() if n > 1}
        self.dit = DiT(
            n_tokens,
            token_dim,
            dit_hidden,
            dit_depth,
            dit_heads,
            dit_mlp_ratio,
            categorical_sizes=cond_sizes,
            n_continuous=n_continuous_cov,
            p_uncond=p_uncond,
        )
        self.dit_ema = copy.deepcopy(self.dit).requires_grad_(False)
        # Scale that brings stage-1 tokens to unit variance before diffusion (set by the model).
        self.register_buffer("latent_scale", torch.ones(()))
        # Bound of the scaled tokens (set with latent_scale): samplers clip the predicted
        # clean tokens to it.
        self.register_buffer("latent_clip", torch.full((), 5.0))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        # Fraction of all counts that falls on each gene in the pretraining data (set by the
        # model); with ``gene_mask`` it rescales the library of cells missing some genes.
        self.register_buffer("ref_gene_frac", torch.full((n_input,), 1.0 / n_input))
        self.register_buffer("gene_mask", torch.ones(n_input, dtype=torch.bool))
        # Genes each batch observes ((n_batch, G), or None: every batch observes every
        # gene): data pretrained across files with different genes. Set by the model from
        # its setup (saved in its config, so not part of the weights).
        self.register_buffer("batch_gene_mask", None, persistent=False)
        self.px_r_extra: nn.Parameter | None = None
        # Categories added after pretraining (query mapping), to rebuild the shapes on load.
        self.extension = {"batch": 0, "labels": 0, "cat_covs": [0] * len(self.n_cats_per_cov)}
        self._init_adaptation()

    def config(self) -> dict:
        """JSON that, with ``state_dict()``, rebuilds this module (:meth:`rebuild`)."""
        return {
            "hparams": self.hparams_,
            "extension": self.extension,
            "adaptation": self.adaptation_meta(),
        }

    @classmethod
    def rebuild(cls, config: dict) -> SCFMModule:
        """An empty module shaped like the one ``config`` describes, adapters included;
        then ``load_state_dict`` and ``restore_adaptation``."""
        # Saves from before ``encoder_rank`` have one full gene map.
        module = cls(**{"encoder_rank": None, **config["hparams"]})
        ext = config.get("extension") or {}
        if any([ext.get("batch", 0), ext.get("labels", 0), *ext.get("cat_covs", [])]):
            module.extend_categories(ext["batch"], ext["labels"], ext["cat_covs"])
        module.build_adapters(config.get("adaptation", {}))
        return module

    def compile_targets(self) -> list[nn.Module]:
        """The networks ``SCFM.train(compile=True)`` compiles: encoder, decoder, DiT."""
        return [self.encoder, self.decoder, self.dit]

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: Stage) -> None:
        """Select what ``loss`` trains and freeze everything else."""
        if stage not in ("vae", "prior"):
            raise ValueError(f"stage={stage!r}; use 'vae' or 'prior'.")
        self.stage = stage
        vae_parts = (self.encoder, self.decoder)
        params = dict(self.named_parameters())
        for name, on in self.trainable_mask(stage).items():
            params[name].requires_grad_(on)
        # Lightning keeps each submodule's train/eval mode: set it here, so that the frozen
        # VAE encodes without dropout while the prior trains (and vice versa).
        self.train()
        for part in (*vae_parts, self.dit_ema) if stage == "prior" else (self.dit, self.dit_ema):
            part.eval()

    # ------------------------------------------------------------------ query mapping
    def extend_categories(
        self, n_new_batch: int = 0, n_new_labels: int = 0, n_new_cats: list[int] | None = None
    ) -> None:
        """Add categories for a query data set: new batches and covariate levels.

        New rows live in separate parameters (``*.extra``, ``px_r_extra``); the pretrained
        rows are untouched. Call before ``add_adapter``: extension rows train along with
        whichever adapter is active.
        """
        n_new_cats = list(n_new_cats or [0] * len(self.n_cats_per_cov))
        if (
            len(n_new_cats) != len(self.n_cats_per_cov)
            or min([n_new_batch, n_new_labels, *n_new_cats]) < 0
        ):
            raise ValueError(f"Expected {len(self.n_cats_per_cov)} non-negative counts.")
        if n_new_labels and "labels" in self.dit.cat_embed:
            for net in (self.dit, self.dit_ema):
                net.cat_embed["labels"].extend(n_new_labels)
        self.n_labels += n_new_labels
        sizes = [n_new_batch, *n_new_cats]
        for emb, lib_emb, k in zip(self.decoder.cov_embed, self.decoder.lib_embed, sizes):
            emb.extend(k)
            lib_emb.extend(k)
        if n_new_batch and "batch" in self.dit.cat_embed:
            for net in (self.dit, self.dit_ema):
                net.cat_embed["batch"].extend(n_new_batch)
        for i, k in enumerate(n_new_cats):
            name = f"cat_cov_{i}"
            if k and name in self.dit.cat_embed:
                for net in (self.dit, self.dit_ema):
                    net.cat_embed[name].extend(k)
        if n_new_batch and self.batch_gene_mask is not None:  # new batches: every gene
            new = self.batch_gene_mask.new_ones(n_new_batch, self.n_input)
            self.batch_gene_mask = torch.cat([self.batch_gene_mask, new])
        if n_new_batch:
            if self.dispersion == "gene-batch":
                init = self.px_r.detach().mean(1, keepdim=True).expand(-1, n_new_batch)
                prev = [] if self.px_r_extra is None else [self.px_r_extra.data]
                self.px_r_extra = nn.Parameter(torch.cat([*prev, init.clone()], 1))
            self.n_batch += n_new_batch
        self.n_cats_per_cov = [n + k for n, k in zip(self.n_cats_per_cov, n_new_cats)]
        ext = self.extension
        ext["batch"] += n_new_batch
        ext["labels"] += n_new_labels
        ext["cat_covs"] = [a + b for a, b in zip(ext["cat_covs"], n_new_cats)]
        self.set_stage(self.stage)

    def set_gene_mask(self, observed: torch.Tensor | None) -> None:
        """Mark genes absent from the data (``False``): their inputs carry no signal, the
        library is rescaled by the pretraining share of the observed genes, and their
        likelihood terms are left out. ``None`` observes every gene."""
        if observed is None:
            self.gene_mask.fill_(True)
            return
        observed = torch.as_tensor(observed, dtype=torch.bool, device=self.gene_mask.device)
        if observed.shape != self.gene_mask.shape:
            raise ValueError(
                f"gene mask has shape {tuple(observed.shape)}, expected "
                f"{tuple(self.gene_mask.shape)}."
            )
        self.gene_mask.copy_(observed)

    def set_batch_gene_mask(self, observed: torch.Tensor | None) -> None:
        """Mark, per batch, the genes its cells do not measure (``False``; shape
        ``(n_batch, G)``): cells of data sets with different gene panels, aligned to one
        vocabulary. Such genes are unobserved for that batch's cells, as with
        :meth:`set_gene_mask` for all cells. ``None``: every batch observes every gene."""
        if observed is None:
            self.batch_gene_mask = None
            return
        observed = torch.as_tensor(observed, dtype=torch.bool, device=self.gene_mask.device)
        if observed.shape != (self.n_batch, self.n_input):
            raise ValueError(
                f"batch gene mask has shape {tuple(observed.shape)}, expected "
                f"({self.n_batch}, {self.n_input}): one row per batch, one column per gene."
            )
        self.batch_gene_mask = None if bool(observed.all()) else observed

    @property
    def masks_genes(self) -> bool:
        return not bool(self.gene_mask.all()) or self.batch_gene_mask is not None

    def cell_gene_mask(self, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """The genes observed in each cell: ``(G,)`` for all cells alike, or ``(B, G)`` when
        batches observe different genes and ``batch_index`` is given."""
        if self.batch_gene_mask is None or batch_index is None:
            return self.gene_mask
        return self.gene_mask & self.batch_gene_mask[batch_index.long().view(-1)]

    def observed_panels(self, batch_index: torch.Tensor) -> torch.Tensor | None:
        """Each cell's genes ``(B, G)`` where batches observe different genes (the
        ``observed=`` of :meth:`decode` for an observed library), else ``None``."""
        return None if self.batch_gene_mask is None else self.cell_gene_mask(batch_index)

    def reference_input(self) -> torch.Tensor:
        """Normalised expression ``(1, G)`` of the average pretraining cell (the pseudo-bulk
        of ``ref_gene_frac``): the baseline of attributions."""
        return torch.log1p(self.ref_gene_frac * 1e4)[None]

    def observed_share(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pretraining share of all counts that falls on the observed (unmasked) genes:
        a scalar, or ``(B, 1)`` for a per-cell ``mask`` (:meth:`cell_gene_mask`)."""
        mask = self.gene_mask if mask is None else mask
        share = (self.ref_gene_frac * mask).sum(-1, keepdim=mask.dim() > 1)
        return share.clamp(min=1e-6)

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step of the DiT weights (warm-up: short runs still track the weights)."""
        self.ema_steps += 1
        decay = min(self.ema_decay, (1 + self.ema_steps.item()) / (10 + self.ema_steps.item()))
        for p_ema, p in zip(self.dit_ema.parameters(), self.dit.parameters()):
            if p.requires_grad:  # frozen (pretrained) weights keep their own EMA values
                p_ema.lerp_(p.detach(), 1 - decay)

    # ------------------------------------------------------------------ protocol
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return {
            K.X: tensors[REGISTRY_KEYS.X_KEY],
            K.BATCH: tensors[REGISTRY_KEYS.BATCH_KEY],
        }

    def prior_tokens(self, inference_outputs: dict) -> torch.Tensor:
        """The tokens the DiT prior learns and generates: posterior samples, or with
        ``prior_target="mean"`` the posterior means (no encoder noise)."""
        if self.prior_target == "mean":
            return inference_outputs[K.QZ].loc
        return inference_outputs[K.Z]

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        tokens = inference_outputs[K.Z]
        if self.stage == "prior":
            tokens = self.prior_tokens(inference_outputs)
        return {
            K.Z: tokens,
            K.LIBRARY: inference_outputs[K.LIBRARY],
            "conditions": self.conditions(tensors),
        }

    def conditions(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Covariate tensors keyed by condition name (batch, labels, cat_cov_i, continuous)."""
        out = {"batch": tensors[REGISTRY_KEYS.BATCH_KEY].long().view(-1)}
        if REGISTRY_KEYS.LABELS_KEY in tensors:
            out["labels"] = tensors[REGISTRY_KEYS.LABELS_KEY].long().view(-1)
        cats = tensors.get(REGISTRY_KEYS.CAT_COVS_KEY)
        if cats is not None:
            for i in range(cats.shape[1]):
                out[f"cat_cov_{i}"] = cats[:, i].long()
        conts = tensors.get(REGISTRY_KEYS.CONT_COVS_KEY)
        if conts is not None:
            out["continuous"] = conts.float()
        return out

    def normalize(
        self, x: torch.Tensor, batch_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log1p`` of counts scaled to 10,000 per cell, and the observed library size.

        With masked genes the library is divided by the pretraining share of the observed
        genes, so that the scale matches cells that have every gene, and masked genes are
        zero (no signal into the encoder's linear map). Per-batch masks apply where
        ``batch_index`` is given.
        """
        if not self.masks_genes:
            library = x.sum(-1, keepdim=True)
            return torch.log1p(x / library.clamp(min=1.0) * 1e4), library
        mask = self.cell_gene_mask(batch_index)
        x = x * mask.to(x.dtype)
        library = x.sum(-1, keepdim=True)  # of the observed genes only
        share = self.observed_share(mask)
        x_norm = torch.log1p(x / (library / share).clamp(min=1.0) * 1e4)
        return x_norm, library

    @auto_move_data
    def posterior_mean(self, x: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """The tokens' posterior mean ``(B, n_tokens, token_dim)``, as ``inference``'s
        ``qz.loc`` but without the variance or a sample (embedding)."""
        return self.encoder.mean(self.normalize(x, batch_index)[0])

    @auto_move_data
    def inference(self, x: torch.Tensor, batch_index: torch.Tensor, n_samples: int = 1) -> dict:
        """Posterior over latent tokens ``(B, n_tokens, token_dim)`` and a sample of it."""
        x_norm, library = self.normalize(x, batch_index)
        mean, var = self.encoder(x_norm)
        qz = Normal(mean, var.sqrt())
        z = qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))
        return {K.QZ: qz, K.Z: z, K.LIBRARY: library}

    def decode(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        transform_batch: torch.Tensor | None = None,
        observed: torch.Tensor | None = None,
    ) -> torch.distributions.Distribution:
        """Count distribution of tokens ``z`` (any leading sample dims) at ``library``.

        ``library`` covers the observed genes: those of the model's gene mask, or with
        ``observed`` (``(B, G)``, :meth:`cell_gene_mask`) each cell's own. Pass
        ``observed`` only where ``library`` is the cell's observed library (training,
        reconstruction, posterior predictive samples); a fixed or sampled library is one of
        every gene of the model, the same for every batch.
        """
        z2, covs, lead, batch = self._decoder_inputs(z, conditions, transform_batch)
        scale, zi_logits = self.decoder(z2, covs)  # (S*B, G)
        scale = scale.view(*lead, -1)
        mask = self.gene_mask if observed is None else observed
        if observed is not None or not bool(self.gene_mask.all()):
            share = (scale * mask.to(scale.dtype)).sum(-1, keepdim=True)
            rate = library * scale / share.clamp(min=1e-8)
        else:
            rate = library * scale
        if self.gene_likelihood == "poisson":
            return Poisson(rate)
        if self.dispersion == "gene-batch":
            px_r = self.px_r
            if self.px_r_extra is not None:
                px_r = torch.cat([px_r, self.px_r_extra], 1)
            theta = F.linear(F.one_hot(batch.long(), self.n_batch).float(), px_r).exp()
        else:
            theta = self.px_r[:, 0].exp()
        if self.gene_likelihood == "zinb":
            return ZeroInflatedNegativeBinomial(
                mu=rate, theta=theta, zi_logits=zi_logits.view(*lead, -1), scale=scale
            )
        if theta.dim() == 1:  # one dispersion per gene: its terms once per gene
            return GeneNegativeBinomial(mu=rate, theta=theta, scale=scale)
        return NegativeBinomial(mu=rate, theta=theta, scale=scale)

    def _decoder_inputs(
        self,
        z: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        transform_batch: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Size, torch.Tensor]:
        """Tokens with sample dims flattened ``(S*B, T, d)``, the decoder covariates
        repeated to match, the leading dims and the (transformed) batch codes."""
        batch = conditions["batch"] if transform_batch is None else transform_batch
        covs = self._decoder_covariates({**conditions, "batch": batch})
        z2 = z.reshape(-1, *z.shape[-2:])
        reps = z2.shape[0] // batch.shape[0]
        return z2, [c.repeat(reps) for c in covs], z.shape[:-2], batch

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        conditions: dict[str, torch.Tensor] | None = None,
        drop: dict[str, torch.Tensor] | None = None,
        use_ema: bool = False,
    ) -> torch.Tensor:
        net = self.dit_ema if use_ema else self.dit
        return net(x_t, t, self._dit_conditions(conditions), drop)

    def _dit_conditions(self, conditions: dict | None) -> dict:
        conditions = conditions or {}
        names = set(self.dit.cat_embed) | {"continuous"}
        return {k: v for k, v in conditions.items() if k in names}

    @auto_move_data
    def generative(self, z: torch.Tensor, library: torch.Tensor, conditions: dict) -> dict:
        if self.stage == "vae":  # the library is the cells' observed one
            observed = self.observed_panels(conditions["batch"])
            return {K.PX: self.decode(z, library, conditions, observed=observed)}
        x0 = z.detach() * self.latent_scale  # (B, T, d)
        t = self.schedule.sample_t(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        conds = self._dit_conditions(conditions)
        drop = None
        if self.training and self.dit.p_uncond > 0:
            drop = {k: torch.rand(x0.shape[0], device=x0.device) < self.dit.p_uncond for k in conds}
        return {
            K.DIFF_OUT: self.dit(x_t, t, conds, drop),
            K.DIFF_TARGET: self.schedule.target(x0, t, noise),
        }

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        if self.stage == "vae":
            x = tensors[REGISTRY_KEYS.X_KEY]
            log_p = generative_outputs[K.PX].log_prob(x)  # (B, G)
            if self.masks_genes:  # a masked gene is unobserved, not an observed zero
                mask = self.cell_gene_mask(tensors[REGISTRY_KEYS.BATCH_KEY])
                log_p = log_p * mask.to(log_p.dtype)
            rec = -log_p.sum(-1)  # (B,)
            qz = inference_outputs[K.QZ]
            prior = Normal(torch.zeros_like(qz.loc), 1.0)
            kl_z = kl(qz, prior).sum((-1, -2))  # (B,)
            # Fitted on the tokens the DiT learns and generates (posterior samples, or means
            # with prior_target="mean"): generated tokens get a library of their kind.
            lib_nll = self.library_nll(
                self.prior_tokens(inference_outputs).detach(),
                inference_outputs[K.LIBRARY],
                self.conditions(tensors),
            )
            loss = (rec + kl_weight * kl_z).mean() + lib_nll.mean()
            # The library model is fitted beside the ELBO (on detached tokens), so the
            # ELBO stays comparable with scVI's; its NLL is logged on its own.
            return LossOutput(
                loss=loss,
                reconstruction_loss=rec,
                kl_local=kl_z,
                extra_metrics={"library_nll": lib_nll.mean().detach()},
            )
        err = generative_outputs[K.DIFF_OUT] - generative_outputs[K.DIFF_TARGET]
        mse = err.float().pow(2).mean((-1, -2))  # (B,)
        # The denoising error stands in the ELBO slot so that scvi-tools' metrics,
        # early stopping and history work unchanged for the prior stage.
        return LossOutput(
            loss=mse.mean(),
            reconstruction_loss=mse,
            kl_local=torch.zeros_like(mse),
            extra_metrics={"diffusion_mse": mse.mean().detach()},
        )

    def _decoder_covariates(self, conditions: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [conditions["batch"]] + [
            conditions[f"cat_cov_{i}"] for i in range(len(self.n_cats_per_cov))
        ]

    def library_nll(
        self, z: torch.Tensor, library: torch.Tensor, conditions: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Negative log-likelihood of each cell's log library size under the library model.

        With masked genes the observed library is rescaled to the full gene set first.
        """
        if self.masks_genes:
            library = library / self.observed_share(self.cell_gene_mask(conditions.get("batch")))
        mu, sigma = self.decoder.library(z, self._decoder_covariates(conditions))
        return -Normal(mu, sigma).log_prob(library.clamp(min=1.0).log()).sum(-1)

    @torch.no_grad()
    def sample_library(
        self,
        z: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Library sizes ``(B, 1)`` drawn from the library model given tokens ``z``."""
        mu, sigma = self.decoder.library(z, self._decoder_covariates(conditions))
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return (mu + sigma * noise).exp()

    # ------------------------------------------------------------------ sampling
    def guided_denoiser(
        self,
        conditions: dict[str, torch.Tensor] | None = None,
        guidance_scale: float | dict[str, float] = 1.0,
        use_ema: bool = True,
    ):
        """The DiT as a ``denoise(x_t, t)`` callable with classifier-free guidance.

        ``guidance_scale`` is one number for all conditions jointly,
        ``out_null + s (out_cond - out_null)`` (0 unconditional, 1 plain conditional), or a
        dict of one scale per condition name (missing names: 1). Per condition ``k`` the
        guided output is ``out_all + sum_k (s_k - 1) (out_all - out_all_but_k)``: 0
        marginalises the condition, 1 keeps it as trained, above 1 amplifies it. Conditions
        absent from ``conditions`` are null. All passes run as one batched forward.
        """
        net = self.dit_ema if use_ema else self.dit
        conds = self._dit_conditions(conditions)
        if isinstance(guidance_scale, dict):
            unknown = set(guidance_scale) - set(net.condition_names)
            if unknown:
                raise KeyError(
                    f"guidance_scale names unknown conditions {sorted(unknown)}; the prior "
                    f"is conditioned on {net.condition_names}."
                )
            scales = {k: float(guidance_scale.get(k, 1.0)) for k in conds}
            groups = [[k] for k, v in scales.items() if v != 1.0]
            weights = [scales[g[0]] - 1.0 for g in groups]
        else:
            groups = [list(conds)] if conds and float(guidance_scale) != 1.0 else []
            weights = [float(guidance_scale) - 1.0]

        if not groups:
            return lambda x, t: net(x, t, conds)

        n_pass = 1 + len(groups)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            rep = {k: v.repeat(n_pass, *([1] * (v.dim() - 1))) for k, v in conds.items()}
            drop = {k: torch.zeros(n_pass * b, dtype=torch.bool, device=x.device) for k in conds}
            for i, group in enumerate(groups, start=1):
                for k in group:
                    drop[k][i * b : (i + 1) * b] = True
            out = net(x.repeat(n_pass, 1, 1), t.repeat(n_pass), rep, drop).view(
                n_pass, b, *x.shape[1:]
            )
            full = out[0]
            guided = full
            for i, w in enumerate(weights, start=1):
                guided = guided + w * (full - out[i])
            return guided

        return denoise

    @torch.no_grad()
    def sample_tokens(
        self,
        n: int,
        conditions: dict[str, torch.Tensor] | None = None,
        guidance_scale: float | dict[str, float] = 1.0,
        n_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        x_T: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Draw latent tokens from the prior (EMA weights), in stage-1 units.

        ``sampler="ddim"`` with ``eta`` (0: deterministic given the starting noise),
        ``"ddpm"`` ancestral sampling over ``n_steps``. ``x_T`` replaces the starting noise
        (e.g. inverted tokens, see :meth:`invert_tokens`) at time ``strength * (T - 1)``.
        """
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler={sampler!r}; use 'ddim' or 'ddpm'.")
        device = self.latent_scale.device
        if x_T is None:
            shape = (n, self.n_tokens, self.token_dim)
            x_T = torch.randn(shape, generator=generator, device=device)
        denoise = self.guided_denoiser(conditions, guidance_scale)
        if sampler == "ddpm":
            eta = 1.0
        clip = float(self.latent_clip)
        x0 = ddim_sample(
            denoise, self.schedule, x_T, n_steps, eta, generator, progress, strength, clip
        )
        return x0 / self.latent_scale

    @torch.no_grad()
    def invert_tokens(
        self,
        z: torch.Tensor,
        conditions: dict[str, torch.Tensor] | None = None,
        n_steps: int = 50,
        strength: float = 1.0,
        progress: bool = False,
    ) -> torch.Tensor:
        """DDIM-invert stage-1 tokens ``z`` under their own ``conditions`` (no guidance):
        the noise that :meth:`sample_tokens` (``eta=0``, same ``n_steps`` and ``strength``)
        maps back to ``z``, or to its counterfactual under other conditions."""
        denoise = self.guided_denoiser(conditions, 1.0)
        x0 = z * self.latent_scale
        return ddim_invert(denoise, self.schedule, x0, n_steps, progress, strength)

    @torch.no_grad()
    def sample(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> torch.Tensor:
        """Posterior predictive counts for the cells in ``tensors``, ``(S, B, G)`` or ``(B, G)``."""
        inf = self.inference(**self._get_inference_input(tensors), n_samples=n_samples)
        conds = self.conditions(tensors)
        px = self.decode(
            inf[K.Z], inf[K.LIBRARY], conds, observed=self.observed_panels(conds["batch"])
        )
        return px.sample()

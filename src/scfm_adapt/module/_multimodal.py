"""The multimodal SCFM module: one token sequence over RNA plus protein and/or ATAC.

Same two stages as :class:`~scfm_adapt.module.SCFMModule`; only stage 1 changes. Each
modality has its own tokenizer and likelihood, the tokens join into one sequence (with
modality embeddings) and the DiT prior and the adaptation strategies act on that sequence
unchanged.

Likelihoods
-----------
RNA
    NB, ZINB or Poisson, as in the RNA-only module.
protein (``"mixture"``, default, or ``"nb"``)
    Antibody-derived tags carry a background of non-specific binding and ambient
    antibodies on top of the specific signal, so that each protein's counts are bimodal
    (negative and positive cells both far from 0). ``"mixture"`` is totalVI's
    background-plus-foreground NB mixture: background rate ``b``, foreground rate
    ``b (1 + softplus(f))`` > ``b`` and a per-cell, per-protein probability of background;
    ``"nb"`` is a single NB per protein. ``benchmarks/multimodal.py`` prints the held-out
    likelihood of both.
ATAC (``"poisson"``)
    Fragment counts per peak, Poisson at the cell's ATAC library (PoissonVI, Martens et al.
    2023, found the counts informative beyond their binarised form, and a Poisson keeps the
    library out of the latent as the RNA likelihood does).

Missing data
------------
A cell whose counts of a modality are all zero lacks that modality: its tokens are masked in
the encoder (a learned mask embedding, not the tokenizer's output on zeros) and its
likelihood and library terms are left out. Proteins that a batch's panel did not measure
(all zero in that batch, scvi-tools' ``protein_batch_mask``) are left out of that batch's
likelihood. During training, with probability ``p_modality_dropout`` a cell that has two or
more modalities has one of them masked in the encoder *but kept in the likelihood*: the
model learns to fill a modality in from the others, which is what cross-modal prediction
(protein from RNA alone) asks of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, NegativeBinomialMixture
from scvi.module.base import LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal, Poisson
from torch.distributions import kl_divergence as kl

from ..nn._multimodal import MultimodalTokenDecoder, MultimodalTokenEncoder
from ._keys import MODULE_KEYS as K
from ._scfm import SCFMModule

#: Registry key of each extra modality's counts.
MODALITY_KEYS = {"protein": REGISTRY_KEYS.PROTEIN_EXP_KEY, "atac": "atac"}
#: Likelihoods each extra modality accepts (the first is the default).
MODALITY_LIKELIHOODS = {"protein": ("mixture", "nb"), "atac": ("poisson",)}
#: Default number of tokens of each extra modality.
MODALITY_TOKENS = {"protein": 2, "atac": 4}


class MultimodalSCFMModule(SCFMModule):
    """Latent-token VAE over several modalities plus the conditional DiT prior.

    Parameters
    ----------
    n_input
        Number of RNA genes.
    modalities
        Extra modalities, in sequence order after RNA: name (``"protein"`` or ``"atac"``) →
        ``{"n_features": int, "n_tokens": int, "likelihood": str}``.
    p_modality_dropout
        Probability, per training cell with two or more modalities, of masking one of them in
        the encoder (kept in the likelihood).
    **kwargs
        :class:`~scfm_adapt.module.SCFMModule` arguments; ``n_tokens`` is the number of RNA
        tokens.
    """

    def __init__(
        self,
        n_input: int,
        modalities: dict[str, dict],
        p_modality_dropout: float = 0.25,
        **kwargs,
    ):
        hparams = {
            "n_input": n_input,
            "modalities": {m: dict(s) for m, s in modalities.items()},
            "p_modality_dropout": p_modality_dropout,
            **kwargs,
        }
        specs = {}
        for m, spec in modalities.items():
            if m not in MODALITY_LIKELIHOODS:
                raise ValueError(f"Unknown modality {m!r}; use {sorted(MODALITY_LIKELIHOODS)}.")
            lik = spec.get("likelihood") or MODALITY_LIKELIHOODS[m][0]
            if lik not in MODALITY_LIKELIHOODS[m]:
                raise ValueError(
                    f"{m} likelihood {lik!r}; choose one of {MODALITY_LIKELIHOODS[m]}."
                )
            specs[m] = {
                "n_features": int(spec["n_features"]),
                "n_tokens": int(spec.get("n_tokens") or MODALITY_TOKENS[m]),
                "likelihood": lik,
            }
        if not 0.0 <= p_modality_dropout < 1.0:
            raise ValueError(f"p_modality_dropout={p_modality_dropout}; use 0 <= p < 1.")
        n_rna = int(kwargs.pop("n_tokens", 8))
        total = n_rna + sum(s["n_tokens"] for s in specs.values())
        super().__init__(n_input, n_tokens=total, **kwargs)
        self.hparams_ = hparams
        self.mod_specs = specs
        self.p_modality_dropout = p_modality_dropout
        rna_encoder = self.encoder  # built from the same kwargs: reuse its sizes
        self.encoder = MultimodalTokenEncoder(
            {"rna": (n_input, n_rna)}
            | {m: (s["n_features"], s["n_tokens"]) for m, s in specs.items()},
            self.token_dim,
            rna_encoder.hidden,
            len(rna_encoder.blocks),
            rna_encoder.blocks[0].attn.n_heads,
            rna_encoder.drop.p,
        )
        rna = self.decoder  # the parent's RNA decoder over all tokens: same shapes, plus heads
        self.decoder = MultimodalTokenDecoder(
            n_input,
            total,
            self.token_dim,
            rna.fc.out_features,
            categorical_sizes=[e.weight.shape[0] for e in rna.cov_embed],
            zero_inflation=rna.dropout_head is not None,
            library_hidden=rna.lib_fc.out_features,
            extra={m: (s["n_features"], s["likelihood"]) for m, s in specs.items()},
        )
        self.px_r_mods = nn.ParameterDict(
            {
                m: nn.Parameter(torch.full((s["n_features"],), 2.0))
                for m, s in specs.items()
                if s["likelihood"] != "poisson"
            }
        )
        n_prot = specs.get("protein", {}).get("n_features", 0)
        # Proteins measured in each batch (False: not on that batch's panel).
        self.register_buffer("protein_mask", torch.ones(self.n_batch, n_prot, dtype=torch.bool))
        self.set_stage(self.stage)

    @property
    def modality_names(self) -> list[str]:
        return ["rna", *self.mod_specs]

    def token_slices(self) -> dict[str, slice]:
        return self.encoder.token_slices()

    def extend_categories(self, n_new_batch=0, n_new_labels=0, n_new_cats=None) -> None:
        super().extend_categories(n_new_batch, n_new_labels, n_new_cats)
        if n_new_batch:  # new batches: every protein measured (all-zero cells are masked)
            new = torch.ones(n_new_batch, self.protein_mask.shape[1], dtype=torch.bool)
            self.protein_mask = torch.cat([self.protein_mask, new.to(self.protein_mask.device)])

    # ------------------------------------------------------------------ protocol
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        out = super()._get_inference_input(tensors)
        out["extra"] = {m: tensors[MODALITY_KEYS[m]] for m in self.mod_specs}
        return out

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        out = super()._get_generative_input(tensors, inference_outputs)
        out["libraries"] = inference_outputs["libraries"]
        return out

    def _measured(self, name: str, batch: torch.Tensor) -> torch.Tensor | None:
        """Features of modality ``name`` measured in each cell's batch, or None (all)."""
        if name != "protein":
            return None
        return self.protein_mask[batch.long().view(-1)]

    def _normalize_extra(self, name: str, y: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        if self.mod_specs[name]["likelihood"] == "poisson":
            return torch.log1p(y / total.clamp(min=1.0) * y.shape[-1])
        return torch.log1p(y)

    def _modality_dropout(self, present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(present)
        obs = torch.stack([present[m] for m in names], 1)  # (B, M)
        b, n_mod = obs.shape
        drop = (torch.rand(b, device=obs.device) < self.p_modality_dropout) & (obs.sum(1) >= 2)
        scores = torch.where(obs, torch.rand(b, n_mod, device=obs.device), -1.0)
        hide = F.one_hot(scores.argmax(1), n_mod).bool() & drop[:, None]
        shown = obs & ~hide
        return {m: shown[:, i] for i, m in enumerate(names)}

    @auto_move_data
    def posterior_mean(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The joint tokens' posterior mean (every modality a cell has)."""
        return self.inference(x, batch_index, extra)[K.QZ].loc

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        extra: dict[str, torch.Tensor] | None = None,
        n_samples: int = 1,
        given: tuple[str, ...] | list[str] | None = None,
    ) -> dict:
        """Posterior over the joint tokens.

        ``given`` names the modalities the encoder may see (default: every one a cell has);
        the others are masked, e.g. ``given=("rna",)`` to predict protein from RNA alone.
        """
        extra = extra or {}
        x_norm, library = self.normalize(x, batch_index)
        inputs = {"rna": x_norm}
        present = {"rna": x.sum(-1) > 0}
        libraries = {}
        for m in self.mod_specs:
            y = extra[m].to(x_norm.dtype)
            measured = self._measured(m, batch_index)
            if measured is not None:
                y = y * measured.to(y.dtype)
            total = y.sum(-1, keepdim=True)
            inputs[m] = self._normalize_extra(m, y, total)
            present[m] = total.view(-1) > 0
            libraries[m] = total
        shown = dict(present)
        if given is not None:
            unknown = set(given) - set(present)
            if unknown:
                raise ValueError(
                    f"given={list(given)} names modalities the model lacks: {sorted(unknown)}; "
                    f"it has {self.modality_names}."
                )
            shown = {m: v & (m in given) for m, v in present.items()}
        elif self.training and self.stage == "vae" and self.p_modality_dropout > 0:
            shown = self._modality_dropout(present)
        mean, var = self.encoder(inputs, shown)
        qz = Normal(mean, var.sqrt())
        z = qz.rsample() if n_samples == 1 else qz.rsample((n_samples,))
        return {
            K.QZ: qz,
            K.Z: z,
            K.LIBRARY: library,
            "libraries": libraries,
            "observed": present,
            "shown": shown,
        }

    def decode_modalities(
        self,
        z: torch.Tensor,
        libraries: dict[str, torch.Tensor],
        conditions: dict[str, torch.Tensor],
        transform_batch: torch.Tensor | None = None,
    ) -> dict[str, torch.distributions.Distribution]:
        """Count distributions of the extra modalities given tokens ``z`` (any leading
        sample dims) and, for Poisson modalities, their libraries ``(B, 1)``."""
        z2, covs, lead, _ = self._decoder_inputs(z, conditions, transform_batch)
        outs = self.decoder.modality_outputs(z2, covs)
        dists = {}
        for m, o in outs.items():
            o = o.view(*lead, *o.shape[1:])  # (..., B, F, width)
            lik = self.mod_specs[m]["likelihood"]
            if lik == "poisson":
                rate = libraries[m] * torch.softmax(o[..., 0], -1)
                dists[m] = Poisson(rate.clamp(min=1e-12))
                continue
            theta = self.px_r_mods[m].exp()
            if lik == "mixture":
                back = o[..., 0].clamp(max=15.0).exp()
                fore = back * (1.0 + F.softplus(o[..., 1]))
                dists[m] = NegativeBinomialMixture(
                    mu1=back, mu2=fore, theta1=theta, mixture_logits=o[..., 2]
                )
            else:
                dists[m] = NegativeBinomial(mu=o[..., 0].clamp(max=15.0).exp(), theta=theta)
        return dists

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        conditions: dict,
        libraries: dict[str, torch.Tensor] | None = None,
    ) -> dict:
        out = super().generative(z, library, conditions)
        if self.stage == "vae":
            out["px_mods"] = self.decode_modalities(z, libraries or {}, conditions)
        return out

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        if self.stage != "vae":
            return super().loss(tensors, inference_outputs, generative_outputs, kl_weight)
        observed = inference_outputs["observed"]
        batch = tensors[REGISTRY_KEYS.BATCH_KEY]
        log_p = generative_outputs[K.PX].log_prob(tensors[REGISTRY_KEYS.X_KEY])
        if self.masks_genes:
            log_p = log_p * self.cell_gene_mask(batch).to(log_p.dtype)
        recs = {"rna": -log_p.sum(-1) * observed["rna"]}
        for m, px in generative_outputs["px_mods"].items():
            lp = px.log_prob(tensors[MODALITY_KEYS[m]].to(log_p.dtype))
            measured = self._measured(m, batch)
            if measured is not None:
                lp = lp * measured.to(lp.dtype)
            recs[m] = -lp.sum(-1) * observed[m]
        rec = sum(recs.values())
        qz = inference_outputs[K.QZ]
        kl_z = kl(qz, Normal(torch.zeros_like(qz.loc), 1.0)).sum((-1, -2))
        z = inference_outputs[K.Z].detach()
        conditions = self.conditions(tensors)
        lib_nll = self.library_nll(z, inference_outputs[K.LIBRARY], conditions) * observed["rna"]
        covs = self._decoder_covariates(conditions)
        for m, lib in inference_outputs["libraries"].items():
            if m in self.decoder.mod_lib_out:
                mu, sigma = self.decoder.modality_library(m, z, covs)
                nll = -Normal(mu, sigma).log_prob(lib.clamp(min=1.0).log()).sum(-1)
                lib_nll = lib_nll + nll * observed[m]
        loss = (rec + kl_weight * kl_z).mean() + lib_nll.mean()
        metrics = {f"reconstruction_{m}": r.mean().detach() for m, r in recs.items()}
        metrics["library_nll"] = lib_nll.mean().detach()
        return LossOutput(loss=loss, reconstruction_loss=rec, kl_local=kl_z, extra_metrics=metrics)

    @torch.no_grad()
    def sample_libraries(
        self,
        z: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Library sizes ``(B, 1)`` of the Poisson modalities, drawn given tokens ``z``."""
        covs = self._decoder_covariates(conditions)
        out = {}
        for m in self.decoder.mod_lib_out:
            mu, sigma = self.decoder.modality_library(m, z, covs)
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            out[m] = (mu + sigma * noise).exp()
        return out

"""``PerturbationModel``: perturbation responses as latent deltas on an SCFM backbone."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data.fields import CategoricalObsField, LayerField

from .._slots import SLOTS
from ..data import (
    check_genes,
    check_layer_counts,
    check_not_view,
    check_obs_keys,
    context_labels,
    get_matrix,
    parse_doses,
    parts_and_doses,
)
from ..errors import SCFMInputError, TrainingDivergedError
from ..module import PART_POOLS as _MODULE_PART_POOLS
from ..module import (
    LatentAnchor,
    ResponseFlow,
    ResponseHead,
    SCFMModule,
    fit_response_flow,
    fit_response_head,
)
from ..train import DEFAULT_GRADIENT_CLIP
from ._attributions import pathway_attributions
from ._perturbation_features import gene_feature_table
from ._perturbation_uncertainty import conformal_quantiles, nn_scale, out_of_bag
from ._results import perturbation_anndata
from ._scfm import SCFM
from .base import BaseModel, read_checkpoint, seeded, write_checkpoint

logger = logging.getLogger(__name__)

#: The arguments of :meth:`PerturbationModel.setup_anndata` that define the design.
SETUP_KEYS = (
    "perturbation_key",
    "control_group",
    "covariate_keys",
    "dose_key",
    "layer",
    "batch_key",
    "combination_delimiter",
)
#: Prefix of the backbone's tensors in a PerturbationModel checkpoint.
_BACKBONE = "backbone."


#: The shares of its head's correction an anchored member may keep (chosen on the training
#: units it left out; 0 is the anchor alone).
CORRECTION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Genes (most changed) over which the arithmetic rule's space is scored.
TOP_GENES = 20
#: How a decoded change enters a cell's log-normalised expression (:func:`_ln_change`).
DECODED_CHANGES = ("log_ratio", "counts")
#: What learns the response on top of the anchor (see :class:`PerturbationModel`'s
#: ``response``).
RESPONSES = ("heads", "flow")
#: Where a flow's DiT starts (see :class:`PerturbationModel`'s ``flow_init``).
FLOW_INITS = ("auto", "prior", "scratch")
#: How a perturbation's parts are read (see :class:`PerturbationModel`'s ``part_pool``).
PART_POOLS = ("auto", *_MODULE_PART_POOLS)
#: The classifier-free guidance scales a flow may take (chosen on the training units each
#: member left out, with its correction's share).
GUIDANCE_GRID = (1.0, 1.5, 2.0, 3.0)
#: How predicted cells are built (see :class:`PerturbationModel`'s ``counts``).
COUNTS = ("decoded", "control_plus_change")
#: Where the anchor lives (see :class:`PerturbationModel`'s ``anchor``).
ANCHORS = (None, "latent", "expression")


class UnknownPerturbationError(SCFMInputError, KeyError):
    """A perturbation part was never seen in training and has no features."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _lognorm_t(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(x / x.sum(-1, keepdim=True).clamp(min=1e-8) * 1e4)


class PerturbationModel(BaseModel):
    """Predict how cells respond to perturbations, including unseen ones and combinations.

    A token VAE (:class:`SCFM`; trained on the data's own cells, or a pretrained one adapted
    with LoRA) encodes each cell into latent tokens. A perturbation's response starts at
    the simple models (``anchor="expression"``, the default): a part's own shift in the
    context, its shift in the other contexts (in expression, or as the decoded latent
    arithmetic where left-out training contexts say so), a combination as the sum of its
    parts, an unseen gene by a ridge map of its features. On top, an ensemble of
    :class:`~scfm_adapt.module.ResponseHead` networks (or :class:`~scfm_adapt.module.ResponseFlow`
    DiTs) learns a correction of each control cell's latent that starts at zero: the
    perturbation is embedded as the dose-weighted sum of its parts' embeddings (learned
    for parts seen in training, projected from gene features such as GO for any gene), so
    ``"A+B" == "B+A"`` and unseen genes and combinations get predictions. Heads are
    trained by matching, for every training (context, perturbation) unit, the
    distribution of shifted control latents to the perturbed cells' latents (mean + MMD);
    the share of their correction the model keeps is chosen on the units each member left
    out. Predicted cells are each control cell's counts plus the predicted change, so the
    backbone's reconstruction error cancels; predictions are cells, not only a mean.

    Uncertainty: each ensemble member leaves out a share of the training units; the
    members that did not see a unit predict it, and the spread of their errors, relative
    to the ensemble's disagreement plus the gene's typical response, calibrates intervals
    of the per-gene mean delta (split-conformal, out-of-bag). The OOD score of a request is
    how far its embedding is from the training perturbations plus how far its control
    cells are from the training contexts, each relative to the typical spacing of the
    training ones (0: a training perturbation in a training context).

    Parameters
    ----------
    adata
        Training cells (raw counts) registered with :meth:`setup_anndata`: control cells
        of each context and perturbed cells.
    pretrained
        ``None`` trains an :class:`SCFM` on ``adata``; a trained :class:`SCFM` (or the
        folder it was saved in) is mapped onto ``adata`` with
        :meth:`SCFM.load_query_data` and adapted with ``adapt_strategy``.
    adapt_strategy
        Adapter of a pretrained backbone (``"lora"``, ``"adapter"``, ``"film"``...).
    gene_features
        Features of perturbation parts: ``"auto"`` (GO features,
        :func:`~scfm_adapt.datasets.go_gene_features`, when the GO tables are found, else
        none), ``"go"``, ``"backbone"`` (the
        backbone decoder's weights of measured genes), ``"go+backbone"``, ``None``, or a
        DataFrame indexed by part name.
    n_ensemble
        Members of the ensemble (at least 2; uncertainty needs several).
    emb_dim, hidden, n_layers, dropout
        Size of each response head.
    anchor
        Start every response at the simple models (:class:`~scfm_adapt.module.LatentAnchor`
        gives the rules): a part's own shift in the context, its shift in other contexts
        (arithmetic), a combination as the sum of its parts (additive), an unseen gene by
        a ridge map of its features (linear), else the mean shift. ``"expression"``
        (default) applies them to the cells' log-normalised expression (the shifts of the
        baselines themselves), with the heads' correction added as a decoded change;
        ``"latent"`` to the backbone's latent. With ``"expression"``, the arithmetic rule
        (a part in a context where it was never perturbed) is taken where left-out
        training contexts say it predicts better (``arithmetic_space_``,
        ``decoded_change_``; one-standard-error rule): the mean expression shift, or the
        latent arithmetic decoded as a change of each control cell
        (``arithmetic_validation_`` holds the scores). Either way the heads learn a
        correction that starts at zero, kept only as far as the training units each
        member left out say it helps (``correction_weights_``, one share for the
        ensemble, :func:`choose_correction`): untrained, such a model *is* the baseline.
        ``None``: the heads alone (the default before the anchors; ``benchmarks/README.md``
        compares the two).
    counts
        How predicted cells are built from their control cells: ``"decoded"`` samples the
        decoder at the shifted latent; ``"control_plus_change"`` adds the decoded *change*
        (decoded mean at the shifted latent minus at the cell's own latent) to the control
        cell's observed counts (then rounds stochastically), so the backbone's
        reconstruction error cancels out of the predicted response. ``None``: decoded,
        except with ``anchor="expression"``, which needs the control cells' counts.
    response
        What learns the response beyond the anchor: ``"heads"`` (default), the MLP
        :class:`~scfm_adapt.module.ResponseHead` ensemble, a latent delta per cell; or
        ``"flow"``, an ensemble of :class:`~scfm_adapt.module.ResponseFlow`: a DiT over
        the latent tokens (width ``emb_dim``, depth ``n_layers``), conditioned through
        adaLN on the perturbation's embedding and trained by flow matching to carry each
        (anchored) control cell to the perturbed cells, so predictions are cells drawn
        from a learned distribution (its start noise is fixed by ``seed``). Either starts
        at zero: untrained, the prediction is the anchor's.
    flow_init
        Where a flow's DiT starts: ``"auto"`` (default), a copy of the backbone's trained
        prior (its stage-2 DiT) when the backbone has one, else new weights; ``"prior"``
        requires the prior (an error at :meth:`train` otherwise); ``"scratch"``, new
        weights of width ``emb_dim`` and depth ``n_layers``. Either way the untrained flow
        predicts the anchor exactly. A flow is also conditioned (adaLN) on each cell's
        training context, with a null context for contexts it was not trained on (such as
        a held-out cell type known only by its control cells), and its guidance
        scale is chosen from :data:`GUIDANCE_GRID` on the training units each member left
        out (``guidance_``).
    part_pool
        How a perturbation's parts (with their doses) are read into one embedding:
        ``"sum"``, their dose-weighted sum; ``"attention"``, that sum plus an attention
        read-out of the set (:class:`~scfm_adapt.nn.PartAttentionPool`, zero at
        initialisation), so a part's weight may depend on its partners; ``"auto"``
        (default): attention for a flow, the sum for heads. Both are order-invariant.
    **backbone_kwargs
        :class:`SCFM` arguments when the backbone is trained here. With
        ``tokenizer="pathway"``, the first 16 gene sets (``n_ranked``) are those whose genes
        respond most to the training perturbations (their mean absolute change of
        log-normalised expression from the control cells of the same context; pass
        ``tokenizer_kwargs={"n_ranked": 0}`` to choose by coverage alone), so the pathways
        that explain a response have tokens.

    Examples
    --------
    >>> sfa.model.PerturbationModel.setup_anndata(adata, "condition", control_group="control")
    >>> model = sfa.model.PerturbationModel(adata)
    >>> model.train()
    >>> pred = model.predict_perturbation(ctrl, ["KLF1", "KLF1+MAP2K6"])
    """

    def __init__(
        self,
        adata: AnnData | None,
        pretrained: SCFM | str | Path | None = None,
        *,
        adapt_strategy: str = "lora",
        adapt_parts: Sequence[str] = ("encoder",),
        gene_features: str | pd.DataFrame | None = "auto",
        n_ensemble: int = 5,
        emb_dim: int = 64,
        hidden: int = 256,
        n_layers: int = 2,
        dropout: float = 0.1,
        anchor: str | None = "expression",
        counts: str | None = None,
        response: str = "heads",
        flow_init: str = "auto",
        part_pool: str = "auto",
        registry: dict | None = None,
        _backbone: SCFM | None = None,
        **backbone_kwargs,
    ):
        if adata is None and registry is None:
            raise ValueError(
                "Give the training AnnData, set up with PerturbationModel.setup_anndata(adata, "
                "...)."
            )
        if adata is not None:
            try:
                manager = self._get_most_recent_anndata_manager(adata)
            except ValueError as e:  # scvi-tools: set up, but on another object (a copy)
                raise ValueError(
                    "Call PerturbationModel.setup_anndata(adata, ...) on this very AnnData "
                    "before building the model (a copy, or a file read back, is set up anew)."
                ) from e
            if manager is None:
                raise ValueError(
                    "Call PerturbationModel.setup_anndata(adata, ...) before building the model."
                )
        if response not in RESPONSES:
            raise ValueError(f"response={response!r}; choose one of {RESPONSES}.")
        if flow_init not in FLOW_INITS:
            raise ValueError(f"flow_init={flow_init!r}; choose one of {FLOW_INITS}.")
        if part_pool not in PART_POOLS:
            raise ValueError(f"part_pool={part_pool!r}; choose one of {PART_POOLS}.")
        if part_pool == "auto":
            part_pool = "attention" if response == "flow" else "sum"
        if anchor not in ANCHORS:
            raise ValueError(f"anchor={anchor!r}; choose one of {ANCHORS}.")
        if counts is None:
            counts = "control_plus_change" if anchor == "expression" else "decoded"
        if counts not in COUNTS:
            raise ValueError(f"counts={counts!r}; choose one of {COUNTS}.")
        if anchor == "expression" and counts == "decoded":
            raise ValueError(
                'anchor="expression" shifts the control cells\' own expression: use '
                'counts="control_plus_change" (or None).'
            )
        if n_ensemble < 2:
            raise ValueError(
                "n_ensemble must be at least 2 (the spread of the members is the uncertainty)."
            )
        if _backbone is not None:  # load: the backbone comes from the checkpoint
            backbone = _backbone
        elif pretrained is None:
            args = manager.registry["setup_args"]
            SCFM.setup_anndata(adata, layer=args["layer"], batch_key=args["batch_key"])
            if backbone_kwargs.get("tokenizer") == "pathway":
                backbone_kwargs = _response_ranked_pathways(adata, args, backbone_kwargs)
            backbone = SCFM(adata, **backbone_kwargs)
        else:
            args = manager.registry["setup_args"]
            backbone = SCFM.load_query_data(
                adata, pretrained, strategy=adapt_strategy, parts=tuple(adapt_parts), verbose=False
            )
            if backbone.adata is not adata:  # an aligned copy: set it up for this model too
                type(self).setup_anndata(backbone.adata, **args)
        self.backbone = backbone
        super().__init__(None if adata is None else backbone.adata, registry=registry)
        self.init_kwargs_ = {
            "adapt_strategy": adapt_strategy,
            "adapt_parts": list(adapt_parts),
            "n_ensemble": n_ensemble,
            "emb_dim": emb_dim,
            "hidden": hidden,
            "n_layers": n_layers,
            "dropout": dropout,
            "anchor": anchor,
            "counts": counts,
            "response": response,
            "flow_init": flow_init,
            "part_pool": part_pool,
        }
        self._features_arg = gene_features
        self.pretrained_ = pretrained is not None
        self.var_names_ = list(backbone.var_names_)
        self.heads: list[ResponseHead] = []
        self.anchors_: list[LatentAnchor] = []  # one per member, with an anchor
        self.expression_anchors_: list[LatentAnchor] = []  # with anchor="expression"
        # the same fitted on every training unit: what predictions start from (the
        # members' own, each without its left-out units, serve calibration out of bag)
        self.full_anchors_: dict[str, LatentAnchor] = {}
        self.correction_weights_: list[float] = []  # each member's share of its head (one share)
        self.contexts_: list[str] = []  # the contexts with control cells in training
        # where an expression anchor takes the arithmetic rule (_choose_arithmetic_space)
        self.arithmetic_space_ = "expression"
        self.decoded_change_ = "log_ratio"  # how a decoded change enters (_ln_change)
        self.arithmetic_validation_: dict = {}
        self.flow_prior_ = False  # whether the flow's DiTs started as copies of the prior
        self.flow_contexts_ = True  # whether a flow is conditioned on the context
        self.guidance_ = 1.0  # a flow's classifier-free guidance scale (chosen in train)
        self.history_: dict = {}

    @property
    def module(self) -> SCFMModule:
        """The backbone's module (the response heads run beside it, on the CPU)."""
        return self.backbone.module

    @property
    def setup_(self) -> dict:
        """The perturbation design given to :meth:`setup_anndata`."""
        args = self.registry_["setup_args"]
        return {k: args[k] for k in SETUP_KEYS}

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str,
        control_group: str,
        covariate_keys: Sequence[str] | None = None,
        dose_key: str | None = None,
        layer: str | None = None,
        batch_key: str | None = None,
        combination_delimiter: str = "+",
        **kwargs,
    ) -> None:
        """Register the perturbation design of ``adata`` (raw counts).

        Parameters
        ----------
        perturbation_key
            obs column naming each cell's perturbation; combinations join their parts with
            ``combination_delimiter`` (``"KLF1+MAP2K6"``; order does not matter).
        control_group
            The value of control cells (also allowed as a part, e.g. ``"KLF1+ctrl"``).
        covariate_keys
            obs columns that together define a cell's *context* (cell type, cell line,
            donor): responses are learned per context, from each context's own controls.
        dose_key
            obs column of doses (a number, or one number per part joined by the
            delimiter, e.g. ``"1+0.5"``); without it every part has dose 1.
        layer
            Layer of raw counts (``None``: ``X``).
        batch_key
            obs column of batches, a covariate of the backbone's decoder.

        Raises
        ------
        KeyError
            A named column or layer does not exist.
        ValueError
            No cell has ``control_group``, or the perturbation column has missing values.
        InvalidCountsError
            The counts are not raw integer counts.
        """
        covariate_keys = list(covariate_keys or [])
        control_group = str(control_group)
        setup_method_args = cls._get_setup_method_args(**locals())
        check_obs_keys(adata.obs, [perturbation_key, *covariate_keys, dose_key, batch_key])
        check_not_view(adata)
        check_layer_counts(adata, layer)
        col = adata.obs[perturbation_key]
        if col.isna().any():
            raise SCFMInputError(
                f"adata.obs[{perturbation_key!r}] has {int(col.isna().sum())} missing values; "
                f"label every cell (controls as {control_group!r})."
            )
        values = col.astype(str)
        if not (values == str(control_group)).any():
            shown = sorted(values.unique())[:10]
            raise SCFMInputError(
                f"No cell has {perturbation_key}={control_group!r}; values include {shown}. "
                "Pass the label of the control cells as control_group."
            )
        if dose_key is not None:
            for v in adata.obs[dose_key].astype(str).unique():
                parse_doses(
                    v,
                    1 if combination_delimiter not in v else v.count(combination_delimiter) + 1,
                    combination_delimiter,
                )
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        cls._register(adata, fields, setup_method_args, **kwargs)

    # ------------------------------------------------------------------ parsing
    def _parts_doses(self, name: str, dose=None) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """Canonical (sorted) parts of a perturbation with their doses."""
        s = self.setup_
        return parts_and_doses(name, dose, s["control_group"], s["combination_delimiter"])

    def _label(self, parts: Sequence[str]) -> str:
        return (
            self.setup_["combination_delimiter"].join(parts)
            if parts
            else self.setup_["control_group"]
        )

    def _cell_design(self, adata: AnnData) -> pd.DataFrame:
        s = self.setup_
        obs = adata.obs
        dose = obs[s["dose_key"]].astype(str) if s["dose_key"] else [None] * len(obs)
        ctrl, delim = s["control_group"], s["combination_delimiter"]
        names = obs[s["perturbation_key"]].astype(str)
        rows = [parts_and_doses(p, d, ctrl, delim) for p, d in zip(names, dose)]
        return pd.DataFrame(
            {
                "context": context_labels(obs, s["covariate_keys"]),
                "parts": [r[0] for r in rows],
                "doses": [r[1] for r in rows],
            },
            index=obs.index,
        )

    # ------------------------------------------------------------------ features
    def _resolve_features(self) -> pd.DataFrame | None:
        return gene_feature_table(self._features_arg, self.backbone)

    def _feature_of(self, part: str) -> np.ndarray | None:
        f = self.features_
        if f is None:
            return None
        idx = self._feature_index.get(part)
        return None if idx is None else f.iloc[idx].to_numpy(np.float32)

    def _encode_requests(self, requests: Sequence[tuple[tuple[str, ...], tuple[float, ...]]]):
        """Index, feature and dose tensors ``(P, K)`` for a list of (parts, doses)."""
        k = max(1, max((len(p) for p, _ in requests), default=1))
        nf = 0 if self.features_ is None else self.features_.shape[1]
        idx = torch.full((len(requests), k), -1, dtype=torch.long)
        feats = torch.zeros(len(requests), k, nf)
        dose = torch.zeros(len(requests), k)
        missing = []
        for i, (parts, doses) in enumerate(requests):
            for j, (p, d) in enumerate(zip(parts, doses)):
                seen = self.vocab_.get(p)
                f = self._feature_of(p)
                if seen is None and f is None:
                    missing.append(p)
                idx[i, j] = len(self.vocab_) if seen is None else seen
                if f is not None:
                    feats[i, j] = torch.as_tensor(f)
                dose[i, j] = d
        if missing:
            missing = sorted(set(missing))
            raise UnknownPerturbationError(
                f"No features for perturbation part(s) {missing}: they were not perturbed in "
                "training and are not in the model's gene_features table "
                f"({0 if self.features_ is None else len(self.features_)} parts). Pass a "
                "gene_features DataFrame with rows for them (e.g. go_gene_features(), or "
                "your own gene -> vector table) when building the model."
            )
        return idx, feats, dose

    # ------------------------------------------------------------------ latents
    @torch.inference_mode()
    def _encode_cells(self, adata: AnnData, indices=None, batch_size: int = 512) -> dict:
        bb = self.backbone
        bb.module.eval()
        zs, libs, xs, conds = [], [], [], []
        for tensors in bb._batches(adata, indices, batch_size):
            out = bb.module.inference(**bb.module._get_inference_input(tensors))
            zs.append(out["qz"].loc.float().cpu())
            libs.append(out["library"].float().cpu())
            xs.append(tensors["X"].float().cpu())
            conds.append({k: v.cpu() for k, v in bb.module.conditions(tensors).items()})
        return {
            "z": torch.cat(zs),
            "library": torch.cat(libs),
            "x": torch.cat(xs),
            "conditions": {k: torch.cat([c[k] for c in conds]) for k in conds[0]},
        }

    def _std(self, z: torch.Tensor) -> torch.Tensor:
        return (z.flatten(1) - self.z_mean_) / self.z_std_

    def _unstd(self, zs: torch.Tensor) -> torch.Tensor:
        shape = (-1, self.backbone.module.n_tokens, self.backbone.module.token_dim)
        return (zs * self.z_std_ + self.z_mean_).view(shape)

    @torch.inference_mode()
    def _decode(self, z_tok, library, conditions, sample: bool, batch_size: int = 1024, ratio=None):
        """Expected expression and (if ``sample``) sampled counts, ``(N, G)`` each; with
        ``ratio`` (per gene) the decoded means are rescaled by it (at constant library)."""
        module = self.backbone.module
        dev = module.device
        means, draws = [], []
        for s in range(0, z_tok.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            dist = module.decode(
                z_tok[sl].to(dev),
                library[sl].to(dev),
                {k: v[sl].to(dev) for k, v in conditions.items()},
            )
            if ratio is not None:
                dist = _rescaled(dist, ratio.to(dev))
            means.append(dist.mean.float().cpu())
            if sample:
                draws.append(dist.sample().float().cpu())
        return torch.cat(means), (torch.cat(draws) if sample else None)

    @torch.inference_mode()
    def _request_counts(
        self, zs, library, conditions, x, context, request, ratio=None, *, ensemble=True, full=True
    ):
        """Predicted control cells under one request, ``(N, G)`` each: for the ensemble's
        mean response (``ensemble``) and for each member, as ``(mean, [member, ...])``
        triples of ``(expected, draw, lognorm)``; ``full``: from the anchors fitted on
        every training unit, else from each member's own (out of bag).

        ``counts="decoded"``: the decoder at the shifted latent (``lognorm``: the draw,
        log-normalised). Else the cells' own counts plus the decoded change: the
        decoded mean at the shifted latent minus at the unshifted one (the cell's own
        latent; with ``anchor="expression"``, the latent shifted by the latent anchor of
        the parts the expression anchor shifts, their change being in the counts
        already), rounded by :func:`_round_counts`; ``lognorm`` is then the cell's
        log-normalised expression plus the expression anchor's shift plus the decoded
        change (:func:`_ln_change`, in the form ``decoded_change_``), so that its mean
        change is the anchor's shift exactly when the correction is 0 and no part takes
        the latent arithmetic (the baselines' cells,
        :func:`scfm_adapt.baselines.shifted_cells`, are built the same way).
        """
        idx, feats, dose = request
        anchor, correction = self._member_parts(zs, idx, feats, dose, context, full)
        mode, where = self.init_kwargs_.get("counts", "decoded"), self.init_kwargs_.get("anchor")
        n = zs.shape[0]

        def mean_at(z):  # decoded means at standardised latents z
            return self._decode(self._unstd(z), library, conditions, False, ratio=ratio)[0]

        # the decoded mean the change is taken from: at the cells' own latent, or with an
        # expression anchor at the latent-anchored one (one for all members when shared)
        mu_ref = None
        if mode != "decoded" and where != "expression":
            mu_ref = mean_at(zs)
        shifts, refs = None, anchor
        if where == "expression":
            # the parts the expression anchor shifts; with latent arithmetic the others'
            # shifts are the decoded change of the latent anchor's (self.arithmetic_space_)
            parts = "other" if self.arithmetic_space_ == "latent" else "all"
            expr = [self.full_anchors_["expression"]] if full else self.expression_anchors_
            shifts = torch.stack(
                [self._anchor_shift(a, idx, feats, dose, context, n, parts) for a in expr]
            )
            if parts == "other":  # decoded changes start where the expression-rule parts end
                lat = [self.full_anchors_["latent"]] if full else self.anchors_
                arith = torch.stack(
                    [self._anchor_shift(a, idx, feats, dose, context, n, "arithmetic") for a in lat]
                )
                refs = anchor - arith
            if full:
                shifts = shifts.expand(len(self.heads), -1, -1)
                mu_ref = mean_at(zs + refs[0])

        x_ln = None if mode == "decoded" else _lognorm_t(x)
        ln_ref = None if mu_ref is None else _lognorm_t(mu_ref)
        scale = None if mode == "decoded" else 1e4 / x.sum(-1, keepdim=True).clamp(min=1e-8)
        form = self.decoded_change_

        def counts(a, c, shift, ref):
            if mode == "decoded":
                mu, draw = self._decode(
                    self._unstd(zs + a + c), library, conditions, True, ratio=ratio
                )
                return mu, draw, _lognorm_t(draw)
            mu, mu0, ln0 = mean_at(zs + a + c), mu_ref, ln_ref
            start, ln = x, x_ln
            if shift is not None:  # the cells' expression shifted in log-normalised space
                ln = x_ln + shift
                start = torch.expm1(ln).clamp(min=0) / scale
                if mu0 is None:  # each member's own latent anchor
                    mu0 = mean_at(zs + ref)
                    ln0 = _lognorm_t(mu0)
            expected = (start + mu - mu0).clamp(min=0)
            return expected, _round_counts(expected), ln + _ln_change(ln, mu, mu0, scale, form, ln0)

        mean = None
        if ensemble:
            mean = counts(
                anchor.mean(0),
                correction.mean(0),
                None if shifts is None else shifts.mean(0),
                refs.mean(0),
            )
        members = [
            counts(anchor[m], correction[m], None if shifts is None else shifts[m], refs[m])
            for m in range(len(self.heads))
        ]
        return mean, members

    @torch.inference_mode()
    def _bias_ratio(self, cells: dict, idx=None) -> torch.Tensor:
        """Per-gene ratio of the observed to the decoded mean normalised expression of
        control cells: the decoder's own reconstruction bias, divided out of predictions so
        that a predicted change is measured against the cells it starts from."""
        sel = slice(None) if idx is None else idx
        conds = {k: v[sel] for k, v in cells["conditions"].items()}
        mu, _ = self._decode(cells["z"][sel], cells["library"][sel], conds, sample=False)
        x = cells["x"][sel]
        m_dec = (mu / mu.sum(-1, keepdim=True).clamp(min=1e-8)).mean(0)
        m_obs = (x / x.sum(-1, keepdim=True).clamp(min=1e-8)).mean(0)
        eps = 0.01 / x.shape[1]
        return ((m_obs + eps) / (m_dec + eps)).clamp(0.05, 20.0)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        head_steps: int | None = None,
        cells_per_unit: int | None = None,
        units_per_step: int = 8,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        mmd_weight: float = 1.0,
        holdout_share: float = 0.2,
        train_backbone: bool = True,
        calibration_cells: int = 256,
        correct_decoder_bias: bool = False,
        seed: int = 0,
        progress: bool = True,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        **backbone_train_kwargs,
    ) -> None:
        """Train the backbone (stage 1 only, unless ``stage="both"`` is passed, which
        also trains its prior, the start of a flow's DiT with ``flow_init="auto"``;
        skipped with ``train_backbone=False`` for a backbone that is already trained),
        then the ensemble of response heads, then calibrate the intervals and the OOD
        score.

        Parameters
        ----------
        max_epochs
            Backbone epochs (``None``: scvi-tools' heuristic, at most 200).
        head_steps
            Optimiser steps of each response head (``None``: 1,500 for heads, 300 for a
            flow, whose steps cost more).
        cells_per_unit, units_per_step
            Each step samples ``units_per_step`` training units and ``cells_per_unit``
            control and perturbed cells of each (``None``: 64 for heads, 32 for a flow).
        mmd_weight
            Weight of the MMD term beside the squared mean error (both on standardised
            latents).
        holdout_share
            Share of the training units each member leaves out (their out-of-bag
            predictions calibrate the intervals).
        calibration_cells
            Control cells per unit used to compute out-of-bag deltas.
        correct_decoder_bias
            Divide the decoder's per-gene reconstruction bias on the control cells out of
            every prediction (off by default: it lowered the held-out accuracy on Kang, see
            ``benchmarks/README.md``).
        checkpoint_dir, resume
            Keep the backbone's epoch checkpoints (as :meth:`SCFM.train` does, in
            ``checkpoint_dir/backbone``) and each finished response head (in
            ``checkpoint_dir/response_heads``); ``resume=True`` continues an interrupted
            call (same arguments) to the result of an uninterrupted one.
        **backbone_train_kwargs
            Passed to :meth:`SCFM.train` (``stage``, ``accelerator``, ``batch_size``, ...).
        """
        from scvi.model._utils import get_max_epochs_heuristic
        from tqdm.auto import tqdm

        root = self._checkpoint_folder(checkpoint_dir, resume)
        folder = None if root is None else root / "response_heads"
        if folder is not None and not resume and folder.exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} holds response heads of an earlier run; pass resume=True to "
                "continue it, or another checkpoint_dir."
            )
        self.correct_bias_ = bool(correct_decoder_bias)
        self.guidance_ = 1.0  # chosen again below, after the members are trained
        self.flow_contexts_ = True  # a flow retrained here reads the context
        if head_steps is None:
            head_steps = 300 if self._is_flow() else 1500
        if cells_per_unit is None:
            cells_per_unit = 32 if self._is_flow() else 64
        bb = self.backbone
        start = time.perf_counter()
        if train_backbone or not bb.is_trained_:
            epochs = max_epochs or min(200, get_max_epochs_heuristic(bb.adata.n_obs))
            backbone_train_kwargs.setdefault("enable_progress_bar", progress)
            if root is not None:
                backbone_train_kwargs.update(checkpoint_dir=root / "backbone", resume=resume)
            kw = dict(backbone_train_kwargs)
            kw.setdefault("stage", "vae")
            if kw["stage"] == "both" and "max_epochs_prior" not in kw:
                # the prior's budget in optimiser steps (SCFM.train's prior_steps), not the
                # backbone's epochs, as epochs of this data's minibatches
                from ._scfm import PRIOR_STEPS, prior_epochs

                kw["max_epochs_prior"] = prior_epochs(
                    bb.adata.n_obs,
                    kw.pop("prior_steps", PRIOR_STEPS),
                    kw.get("batch_size", 128),
                    kw.get("devices", "auto"),
                    kw.get("train_size", 0.9),
                    kw.get("validation_size"),
                )
            bb.train(max_epochs=epochs, **kw)
        seconds = {"backbone": time.perf_counter() - start}
        if self._is_flow():
            self.flow_prior_ = self._flow_starts_from_prior()
        self.features_ = self._resolve_features()
        self._feature_index = (
            {} if self.features_ is None else {g: i for i, g in enumerate(self.features_.index)}
        )

        design = self._cell_design(bb.adata)
        cells = self._encode_cells(bb.adata)
        zflat = cells["z"].flatten(1)
        self.z_mean_ = zflat.mean(0)
        self.z_std_ = zflat.std(0).clamp(min=1e-4)
        zs = self._std(cells["z"])

        units, unit_idx, ctrl_idx = _training_units(design)
        self.units_ = [(c, list(p), list(d)) for c, p, d in units]
        self.contexts_ = sorted(ctrl_idx)
        parts = sorted({p for _, ps, _ in units for p in ps})
        self.vocab_ = {p: i for i, p in enumerate(parts)}
        reqs = [(tuple(p), tuple(d)) for _, p, d in units]
        u_idx, u_feat, u_dose = self._encode_requests(reqs)

        n_feat = 0 if self.features_ is None else self.features_.shape[1]
        k_members = self.init_kwargs_["n_ensemble"]
        self.oob_ = out_of_bag(len(units), k_members, holdout_share, seed)
        self.heads, self.history_ = [], {"response_loss": []}
        self.anchors_, self.expression_anchors_, self.correction_weights_ = [], [], []
        u_ctx = self._context_index([c for c, _, _ in units])
        # each unit's observed shift of the mean standardised latent, for the anchors
        shifts = torch.stack(
            [zs[unit_idx[i]].mean(0) - zs[ctrl_idx[c]].mean(0) for i, (c, _, _) in enumerate(units)]
        )
        self.full_anchors_ = {}
        where = self.init_kwargs_.get("anchor")
        fit = (u_ctx, u_idx, u_feat, u_dose)
        if where:
            self.full_anchors_["latent"] = self._fit_anchor(None, units, *fit, shifts, parts)[0]
        ln_shifts = None
        if where:  # each unit's observed shift of mean log-normalised expression
            x_ln = _lognorm_t(cells["x"])
            ln_shifts = torch.stack(
                [
                    x_ln[unit_idx[i]].mean(0) - x_ln[ctrl_idx[c]].mean(0)
                    for i, (c, _, _) in enumerate(units)
                ]
            )
        self.arithmetic_space_, self.decoded_change_ = "expression", "log_ratio"
        self.arithmetic_validation_ = {}
        if where == "expression":
            self.full_anchors_["expression"] = self._fit_anchor(
                None, units, *fit, ln_shifts, parts
            )[0]
            space, form, scores = self._choose_arithmetic_space(
                cells, zs, units, ctrl_idx, fit, shifts, ln_shifts, parts, calibration_cells, seed
            )
            self.arithmetic_space_, self.decoded_change_ = space, form
            self.arithmetic_validation_ = scores
        expr_parts = "other" if self.arithmetic_space_ == "latent" else "all"
        oob_errors = []  # anchored: each member's errors on its left-out units, per weight
        bar = tqdm(total=k_members * head_steps, desc="response heads", disable=not progress)
        for k in range(k_members):
            anchor, unit_shift = self._fit_anchor(k, units, *fit, shifts, parts)
            ln_unit_shift, unit_ref = None, unit_shift
            if where == "expression":
                expr_anchor, _ = self._fit_anchor(k, units, *fit, ln_shifts, parts)
                self.expression_anchors_.append(expr_anchor)
                with torch.no_grad():
                    ln_unit_shift = expr_anchor(*fit, parts=expr_parts)
                    if expr_parts == "other":  # decoded from where the other parts end
                        unit_ref = unit_shift - anchor(*fit, parts="arithmetic")
            saved = None if folder is None else folder / f"member{k}"
            if resume and saved is not None and saved.exists():  # trained before an interruption
                state, info = read_checkpoint(saved)
                rng_state = state.pop("rng_state")
                head = self._new_head(zs.shape[1], n_feat, len(parts))
                head.load_state_dict(state, strict=True)
                # The random state after this member, so later draws continue unchanged (the
                # seed first: it also seeds the GPU's generators, which heads do not use).
                torch.manual_seed(seed * 1000 + k)
                torch.set_rng_state(rng_state)
                losses = list(info["losses"])
                bar.update(head_steps)
            else:
                torch.manual_seed(seed * 1000 + k)
                head = self._new_head(zs.shape[1], n_feat, len(parts))
                losses = self._fit_member(
                    head,
                    k,
                    zs,
                    units,
                    unit_idx,
                    ctrl_idx,
                    (u_idx, u_feat, u_dose),
                    unit_shift,
                    bar,
                    steps=head_steps,
                    cells_per_unit=cells_per_unit,
                    units_per_step=units_per_step,
                    lr=lr,
                    weight_decay=weight_decay,
                    mmd_weight=mmd_weight,
                    seed=seed,
                    unit_contexts=u_ctx,
                )
                if saved is not None:
                    state = {**head.state_dict(), "rng_state": torch.get_rng_state()}
                    write_checkpoint(saved, state, {"losses": losses}, overwrite=True)
            head.eval()
            self.heads.append(head)
            self.history_["response_loss"].append(losses)
            if anchor is not None:
                self.anchors_.append(anchor)
                oob_errors.append(
                    self._correction_errors(
                        head,
                        k,
                        cells,
                        zs,
                        units,
                        ctrl_idx,
                        (u_idx, u_feat, u_dose),
                        unit_shift,
                        unit_ref,
                        ln_unit_shift,
                        ln_shifts,
                        calibration_cells,
                        seed,
                    )
                )
        bar.close()
        weight = 1.0
        if where:
            guidances = GUIDANCE_GRID if self._is_flow() else (1.0,)
            self.guidance_, weight = choose_guidance(np.concatenate(oob_errors), guidances)
            for head in self.heads:
                if isinstance(head, ResponseFlow):
                    head.guidance = self.guidance_
        self.correction_weights_ = [weight] * k_members

        self._calibrate(
            cells,
            zs,
            units,
            unit_idx,
            ctrl_idx,
            u_idx,
            u_feat,
            u_dose,
            calibration_cells,
            seed,
            refit=(fit, shifts, ln_shifts, parts) if where else None,
        )
        self.is_trained_ = True
        seconds["response"] = time.perf_counter() - start - seconds["backbone"]
        self._record_training(seconds)

    def _fit_member(
        self,
        head,
        k,
        zs,
        units,
        unit_idx,
        ctrl_idx,
        requests,
        unit_shift,
        bar,
        *,
        steps,
        cells_per_unit,
        units_per_step,
        lr,
        weight_decay,
        mmd_weight,
        seed,
        unit_contexts=None,
    ) -> list[float]:
        """Train ensemble member ``k`` on its in-bag units; returns its loss curve
        (``unit_contexts``: each unit's index in ``contexts_``, read by a flow)."""
        # each unit's control cells: those of its context
        controls = [ctrl_idx[c] for c, _, _ in units]
        args = dict(
            steps=steps,
            cells_per_unit=cells_per_unit,
            units_per_step=units_per_step,
            lr=lr,
            weight_decay=weight_decay,
            grad_clip=DEFAULT_GRADIENT_CLIP,
            rng=np.random.default_rng(seed * 1000 + k),
            on_step=lambda: bar.update(1),
        )
        inbag = _in_bag(len(units), self.oob_[k])
        data = (zs, inbag, controls, unit_idx, requests, unit_shift)
        try:
            if self._is_flow():
                return fit_response_flow(head, *data, contexts=unit_contexts, **args)
            return fit_response_head(head, *data, mmd_weight=mmd_weight, **args)
        except FloatingPointError as e:
            raise TrainingDivergedError(
                f"PerturbationModel.train: {e} in ensemble member {k}. Lower lr (now {lr}) "
                "or mmd_weight, and check the data for extreme counts."
            ) from e

    def _new_head(self, latent_dim: int, n_features: int, n_parts: int) -> ResponseHead:
        kw = self.init_kwargs_
        if kw.get("response", "heads") == "flow":
            module = self.backbone.module
            emb = kw["emb_dim"]
            prior = module.dit_ema if self.flow_prior_ else None
            return ResponseFlow(
                module.n_tokens,
                module.token_dim,
                n_features,
                n_parts,
                emb,
                emb,
                kw["n_layers"],
                guidance=self.guidance_,
                prior=prior,
                n_contexts=len(self.contexts_) if self.flow_contexts_ else 0,
                part_pool=kw["part_pool"],
            )
        sizes = {k: kw[k] for k in ("emb_dim", "hidden", "n_layers", "dropout", "part_pool")}
        return ResponseHead(latent_dim, n_features, n_parts, **sizes)

    def _flow_starts_from_prior(self) -> bool:
        """Whether the flow's DiTs start as copies of the backbone's prior (``flow_init``);
        a named error where ``"prior"`` is asked for and the backbone has no usable one."""
        init = self.init_kwargs_.get("flow_init", "auto")
        dit = self.backbone.module.dit
        has_prior = "prior" in self.backbone.trained_stages_
        null_untrained = has_prior and dit.condition_names and dit.p_uncond <= 0
        if init == "prior" and null_untrained:
            raise ValueError(
                'flow_init="prior": the backbone\'s prior was trained with p_uncond=0, so its '
                "unconditional mode, which the flow starts from, was never trained. Use "
                'flow_init="scratch", or a prior trained with p_uncond > 0.'
            )
        if init == "prior" and not has_prior:
            raise ValueError(
                'flow_init="prior" needs a backbone with a trained prior: pass pretrained= a '
                "model trained with stage='both', or train(stage='both') to train the "
                'backbone\'s prior here; or use flow_init="auto".'
            )
        return has_prior and not null_untrained and init != "scratch"

    def _is_flow(self) -> bool:
        return self.init_kwargs_.get("response", "heads") == "flow"

    @torch.inference_mode()
    def _member_parts(self, zs, idx, feats, dose, context=None, full: bool = True):
        """``(anchor, correction)``, standardised latent shifts ``(M, N, D)`` of every
        member for one request (``context``: each cell's index in ``contexts_``, ``-1``
        for others): the anchor's (zeros without one; with ``full`` the anchor fitted on
        every training unit, else each member's own) and the head's, weighted. A head
        reads the control cell's latent; a flow starts at the anchored one."""
        n, m = zs.shape[0], len(self.heads)
        if not self.anchors_:
            anchors = torch.zeros(m, *zs.shape, dtype=zs.dtype)
        elif full:  # one anchor for every member
            shift = self._anchor_shift(self.full_anchors_["latent"], idx, feats, dose, context, n)
            anchors = shift.expand(m, -1, -1)
        else:
            own = [self._anchor_shift(a, idx, feats, dose, context, n) for a in self.anchors_]
            anchors = torch.stack(own)
        flow = self._is_flow()

        def correction(h, start, e):  # a flow also reads each cell's context
            return h(start, e, context) if flow else h(start, e)

        corrections = torch.stack(
            [
                w * correction(h, zs + anchors[k] if flow else zs, h.embed(idx, feats, dose)[0])
                if w
                else torch.zeros_like(zs)  # a member that keeps none of its correction
                for k, (w, h) in enumerate(zip(self.correction_weights_, self.heads))
            ]
        )
        return anchors, corrections

    def _member_deltas(
        self, zs: torch.Tensor, idx, feats, dose, context=None, full: bool = True
    ) -> torch.Tensor:
        """Standardised latent deltas ``(M, N, D)`` of every member for one request."""
        anchor, correction = self._member_parts(zs, idx, feats, dose, context, full)
        return anchor + correction

    @staticmethod
    def _anchor_shift(anchor, idx, feats, dose, context, n: int, parts="all") -> torch.Tensor:
        """An anchor's shift ``(n, D)`` of one request for ``n`` cells (of the request's
        ``parts``, see :meth:`LatentAnchor.forward`)."""
        ctx = torch.full((n,), -1, dtype=torch.long) if context is None else context
        uniq, inv = torch.unique(ctx, return_inverse=True)
        r = len(uniq)
        shift = anchor(
            uniq, idx.expand(r, -1), feats.expand(r, -1, -1), dose.expand(r, -1), parts=parts
        )
        return shift[inv]

    def _context_index(self, labels) -> torch.Tensor:
        """Positions of context labels in ``contexts_`` (``-1``: not a training context)."""
        pos = {c: i for i, c in enumerate(self.contexts_)}
        return torch.as_tensor([pos.get(str(c), -1) for c in labels], dtype=torch.long)

    def _part_features(self, parts: Sequence[str]) -> torch.Tensor | None:
        """Features ``(P, F)`` of the vocabulary's parts (zeros for a part without)."""
        if self.features_ is None:
            return None
        out = torch.zeros(len(parts), self.features_.shape[1])
        for i, p in enumerate(parts):
            f = self._feature_of(p)
            if f is not None:
                out[i] = torch.as_tensor(f)
        return out

    def _fit_anchor(self, k, units, u_ctx, u_idx, u_feat, u_dose, shifts, parts, drop=None):
        """Member ``k``'s anchor, fitted on its in-bag units (``k=None``: on all; without
        unit ``drop`` too, unless it is the only one), and the shift it gives every
        training unit (zeros and ``None`` without ``anchor``)."""
        if not self.init_kwargs_.get("anchor"):
            return None, torch.zeros_like(shifts)
        inbag = list(range(len(units))) if k is None else _in_bag(len(units), self.oob_[k])
        if drop is not None and len(inbag) > 1:
            inbag = [i for i in inbag if i != drop]
        inbag = torch.as_tensor(inbag)
        n_feat = 0 if self.features_ is None else self.features_.shape[1]
        anchor = LatentAnchor(shifts.shape[1], len(parts), len(self.contexts_), n_feat)
        anchor.fit(
            u_ctx[inbag], u_idx[inbag], u_dose[inbag], shifts[inbag], self._part_features(parts)
        )
        with torch.no_grad():
            return anchor.eval(), anchor(u_ctx, u_idx, u_feat, u_dose)

    @torch.inference_mode()
    def _choose_arithmetic_space(
        self, cells, zs, units, ctrl_idx, fit, shifts, ln_shifts, parts, n_cells, seed
    ) -> tuple[str, str, dict]:
        """Where an expression anchor takes the arithmetic rule (a part's shift in a context
        where it was never perturbed: its shift in the other contexts), and how a decoded
        change enters the cells' expression. ``"expression"``: the mean log-normalised
        shift (the mean-shift baseline's). ``"latent"``: the mean latent shift, decoded as
        a change of each control cell (latent arithmetic, as scVI's; the backbone's
        reconstruction error cancels out of the change), entering as a ``"log_ratio"`` or
        as ``"counts"`` (:func:`_ln_change`).

        Chosen on training data only: each training context in turn is left out, anchors
        fitted on the others predict its units whose parts all take the rule, and each
        candidate is scored by the Pearson correlation of the predicted and the observed
        mean change over the unit's :data:`TOP_GENES` most changed genes (the benchmarks'
        top-20 ``pearson_delta``). The better latent candidate is kept only when it beats
        ``"expression"`` by more than one standard error of the paired differences (the
        one-standard-error rule, as for the correction share). Returns the space, the
        form, and the scores ``{"units": [...], "expression": [...], "log_ratio": [...],
        "counts": [...]}``.
        """
        u_ctx, u_idx, u_feat, u_dose = fit
        labels = [c for c, _, _ in units]
        n_feat = 0 if self.features_ is None else self.features_.shape[1]
        features = self._part_features(parts)
        rng = np.random.default_rng(seed)
        scores = {"units": [], "expression": [], **{f: [] for f in DECODED_CHANGES}}
        for c in sorted(set(labels)):
            keep = torch.as_tensor([i for i, lab in enumerate(labels) if lab != c], dtype=int)
            held = torch.as_tensor([i for i, lab in enumerate(labels) if lab == c], dtype=int)
            if not len(keep):
                continue
            anchors = []
            for d, y in ((shifts.shape[1], shifts), (ln_shifts.shape[1], ln_shifts)):
                a = LatentAnchor(d, len(parts), len(self.contexts_), n_feat)
                a.fit(u_ctx[keep], u_idx[keep], u_dose[keep], y[keep], features)
                anchors.append(a.eval())
            lat, expr = anchors
            h = (u_ctx[held], u_idx[held], u_feat[held], u_dose[held])
            rule = lat.arithmetic_parts(h[0], h[1])
            alone = rule.sum(1) == (h[1] >= 0).sum(1)  # every part takes the rule
            pred_lat, pred_expr = lat(*h, parts="arithmetic"), expr(*h)
            for j in torch.nonzero(alone).flatten().tolist():
                i = int(held[j])
                ci = ctrl_idx[c]
                ci = rng.choice(ci, size=min(n_cells, ci.size), replace=False)
                conds = {k: v[ci] for k, v in cells["conditions"].items()}
                lib, x = cells["library"][ci], cells["x"][ci]

                def mean_at(z, lib=lib, conds=conds):
                    return self._decode(self._unstd(z), lib, conds, False)[0]

                mu0, mu1 = mean_at(zs[ci]), mean_at(zs[ci] + pred_lat[j])
                scale = 1e4 / x.sum(-1, keepdim=True).clamp(min=1e-8)
                preds = {"expression": pred_expr[j]}
                x_ln = _lognorm_t(x)
                for form in DECODED_CHANGES:
                    preds[form] = _ln_change(x_ln, mu1, mu0, scale, form).mean(0)
                obs = ln_shifts[i]
                top = obs.abs().argsort(descending=True)[:TOP_GENES]
                scores["units"].append(f"{c}: {'+'.join(units[i][1])}")
                for key, pred in preds.items():
                    r = np.corrcoef(pred[top].numpy(), obs[top].numpy())[0, 1]
                    scores[key].append(float(np.nan_to_num(r)))
        if len(scores["units"]) < 2:
            return "expression", "log_ratio", scores
        means = {f: float(np.mean(scores[f])) for f in DECODED_CHANGES}
        form = max(DECODED_CHANGES, key=means.get)
        gain = np.asarray(scores[form]) - np.asarray(scores["expression"])
        if gain.mean() > gain.std(ddof=1) / np.sqrt(len(gain)):
            return "latent", form, scores
        return "expression", "log_ratio", scores

    @torch.inference_mode()
    def _correction_errors(
        self,
        head,
        k,
        cells,
        zs,
        units,
        ctrl_idx,
        requests,
        unit_shift,
        unit_ref,
        ln_unit_shift,
        ln_shifts,
        n_cells,
        seed,
    ) -> np.ndarray:
        """Errors ``(n_left_out, n_guidance, len(CORRECTION_GRID))`` of member ``k`` on
        the units it left out, for each share of its head's correction (and, for a flow,
        each guidance scale of :data:`GUIDANCE_GRID`; one column else): the squared error
        over genes of the predicted mean change of log-normalised expression (the
        quantity the benchmarks score, built as :meth:`_request_counts` builds
        predictions). A flow's start noise is the same for every scale.

        ``unit_shift``: the member's latent anchor of every training unit; ``unit_ref``:
        the latent shift its decoded change is measured from (with an expression anchor);
        ``ln_unit_shift``: its expression anchor (``None`` without one); ``ln_shifts``: the
        observed changes.
        """
        oob = list(self.oob_[k])
        flow = self._is_flow()
        guidances = GUIDANCE_GRID if flow else (1.0,)
        if not oob:
            return np.zeros((0, len(guidances), len(CORRECTION_GRID)))
        u_idx, u_feat, u_dose = requests
        mode = self.init_kwargs_.get("counts", "decoded")
        rng = np.random.default_rng(seed * 1000 + k)
        errors = np.zeros((len(oob), len(guidances), len(CORRECTION_GRID)))
        for row, i in enumerate(oob):
            ci = ctrl_idx[units[i][0]]
            ci = rng.choice(ci, size=min(n_cells, ci.size), replace=False)
            lib = cells["library"][ci]
            conds = {key: v[ci] for key, v in cells["conditions"].items()}
            ratio = self._bias_ratio(cells, ci) if self.correct_bias_ else None

            def mean_at(z, lib=lib, conds=conds, ratio=ratio):  # decoded means
                return self._decode(self._unstd(z), lib, conds, False, ratio=ratio)[0]

            def ln_mean(z):  # mean log-normalised decoded
                return _lognorm_t(mean_at(z)).mean(0)

            e = head.embed(u_idx[i : i + 1], u_feat[i : i + 1], u_dose[i : i + 1])[0]
            z0 = zs[ci] + unit_shift[i]
            context = self._context_index([units[i][0]])

            def correction(g, e=e, z0=z0, ci=ci, context=context, row=row):
                if not flow:
                    return head(zs[ci], e)
                kept, head.guidance = head.guidance, g
                try:  # the same start noise for every scale
                    with torch.random.fork_rng(devices=[]):  # the CPU generator only
                        torch.random.default_generator.manual_seed(seed * 1000 + k * 997 + row)
                        return head(z0, e, context)
                finally:
                    head.guidance = kept

            if mode == "decoded":  # the decoded cells against the observed controls
                base = -_lognorm_t(cells["x"][ci]).mean(0)
                for gi, g in enumerate(guidances):
                    corr = correction(g)
                    for j, w in enumerate(CORRECTION_GRID):
                        pred = base + ln_mean(z0 + w * corr)
                        errors[row, gi, j] = float((pred - ln_shifts[i]).pow(2).mean())
                continue
            # the control cells (shifted by the expression anchor) plus the decoded change
            x = cells["x"][ci]
            scale = 1e4 / x.sum(-1, keepdim=True).clamp(min=1e-8)
            ln, ref, start = _lognorm_t(x), zs[ci], 0.0
            if ln_unit_shift is not None:
                start, ref = ln_unit_shift[i], zs[ci] + unit_ref[i]
                ln = ln + start
            mu0 = mean_at(ref)
            for gi, g in enumerate(guidances):
                corr = correction(g)
                for j, w in enumerate(CORRECTION_GRID):
                    mu = mean_at(z0 + w * corr)
                    change = _ln_change(ln, mu, mu0, scale, self.decoded_change_)
                    pred = start + change.mean(0)
                    errors[row, gi, j] = float((pred - ln_shifts[i]).pow(2).mean())
        return errors

    @torch.inference_mode()
    def _calibrate(
        self, cells, zs, units, unit_idx, ctrl_idx, u_idx, u_feat, u_dose, n_cells, seed, refit=None
    ):
        """Split-conformal calibration of the intervals on out-of-bag predictions, and the
        OOD references.

        A unit's centre is the mean prediction of the members that left it out. Its
        spread is the members' disagreement as it is at prediction time, where no member
        has seen the request: with anchors (``refit``: the anchors' training data), every
        member's anchors are refitted without the unit first (closed form, cheap), so a
        member that saw the unit does not vouch for it. Without that, the members that
        saw a unit give its own shift, the spread of a calibration unit grows with its
        error, and the intervals of new requests come out too narrow.
        """
        rng = np.random.default_rng(seed)
        x_ln = _lognorm_t(cells["x"])
        true, centres, spreads = [], [], []
        for i, (c, _, _) in enumerate(units):
            ci = ctrl_idx[c]
            ci = rng.choice(ci, size=min(n_cells, ci.size), replace=False)
            ctrl_mean = x_ln[ci].mean(0)
            true.append((x_ln[unit_idx[i]].mean(0) - ctrl_mean).numpy())
            ctx = self._context_index([c] * ci.size)
            conds = {k: v[ci] for k, v in cells["conditions"].items()}
            ratio = self._bias_ratio(cells, ci) if self.correct_bias_ else None
            request = (u_idx[i : i + 1], u_feat[i : i + 1], u_dose[i : i + 1])
            own = (self.anchors_, self.expression_anchors_)
            if refit is not None:  # each member's anchors without unit i
                fit, shifts, ln_shifts, parts = refit
                k_all = range(len(self.heads))
                self.anchors_ = [
                    self._fit_anchor(k, units, *fit, shifts, parts, drop=i)[0] for k in k_all
                ]
                if self.expression_anchors_:
                    self.expression_anchors_ = [
                        self._fit_anchor(k, units, *fit, ln_shifts, parts, drop=i)[0] for k in k_all
                    ]
            try:
                _, members = self._request_counts(
                    zs[ci],
                    cells["library"][ci],
                    conds,
                    cells["x"][ci],
                    ctx,
                    request,
                    ratio,
                    ensemble=False,
                    full=False,
                )
            finally:
                self.anchors_, self.expression_anchors_ = own
            per_member = [(ln.mean(0) - ctrl_mean).numpy() for _, _, ln in members]
            per_member = np.stack(per_member)
            oob = [m for m in range(len(self.heads)) if i in self.oob_[m]]
            centres.append(per_member[oob].mean(0) if oob else per_member.mean(0))
            spreads.append(per_member.std(0))
        true, centres, spreads = np.stack(true), np.stack(centres), np.stack(spreads)
        self.gene_scale_, self.calibration_ = conformal_quantiles(true, centres, spreads)
        # OOD references: training perturbation embeddings per member, context means
        treat = sorted({(tuple(p), tuple(d)) for _, p, d in units})
        t_idx, t_feat, t_dose = self._encode_requests(treat)
        self.ood_ref_ = {"embeddings": [h.embed(t_idx, t_feat, t_dose) for h in self.heads]}
        self.ood_ref_["embed_scale"] = [float(nn_scale(e)) for e in self.ood_ref_["embeddings"]]
        ctx_with_units = sorted({c for c, _, _ in units})
        means = torch.stack([zs[ctrl_idx[c]].mean(0) for c in ctx_with_units])
        self.ood_ref_["context_means"] = means
        if len(ctx_with_units) > 1:
            self.ood_ref_["context_scale"] = float(nn_scale(means))
        else:
            ci = ctrl_idx[ctx_with_units[0]]
            self.ood_ref_["context_scale"] = float((zs[ci] - means[0]).norm(dim=1).mean())

    # ------------------------------------------------------------------ prediction
    def _check_trained(self):
        if not self.is_trained_:
            raise RuntimeError("The PerturbationModel is not trained; call model.train() first.")

    def _prepare_ctrl(self, adata_ctrl: AnnData, covariates: Mapping | None) -> AnnData:
        s = self.setup_
        if adata_ctrl.n_obs == 0:
            raise SCFMInputError("adata_ctrl has no cells; pass the control cells to perturb.")
        bb = self.backbone
        if list(map(str, adata_ctrl.var_names)) != bb.var_names_:
            if self.pretrained_:
                from ..data import align_genes

                adata_ctrl = align_genes(adata_ctrl, bb.var_names_, layer=s["layer"])
            else:
                check_genes(adata_ctrl.var_names, bb.var_names_, what="perturbation model")
        keep = np.ones(adata_ctrl.n_obs, bool)
        pk = s["perturbation_key"]
        if pk in adata_ctrl.obs:
            keep &= adata_ctrl.obs[pk].astype(str).to_numpy() == s["control_group"]
            if not keep.any():
                raise SCFMInputError(
                    f"adata_ctrl has no cell with {pk}={s['control_group']!r}; predictions "
                    "start from control cells."
                )
        for key, val in (covariates or {}).items():
            if key not in s["covariate_keys"]:
                raise KeyError(f"{key!r} is not a covariate of the model ({s['covariate_keys']}).")
            if key in adata_ctrl.obs:
                keep &= adata_ctrl.obs[key].astype(str).to_numpy() == str(val)
        if not keep.any():
            raise SCFMInputError(f"No control cell matches covariates={dict(covariates or {})}.")
        chosen = adata_ctrl[keep]
        out = chosen.to_memory() if chosen.isbacked else chosen.copy()  # the control cells only
        for key, val in (covariates or {}).items():
            if key not in out.obs:
                out.obs[key] = str(val)
        for key in s["covariate_keys"]:
            if key not in out.obs:
                raise KeyError(
                    f"adata_ctrl.obs lacks covariate {key!r}; pass covariates={{{key!r}: ...}}."
                )
        return out

    def _request_list(
        self, perturbations, dose
    ) -> list[tuple[str, tuple[str, ...], tuple[float, ...]]]:
        if isinstance(perturbations, str):
            perturbations = [perturbations]
        perturbations = list(perturbations)
        if not perturbations:
            raise SCFMInputError("perturbations is empty; name at least one perturbation.")
        out = []
        for p in perturbations:
            d = dose.get(p) if isinstance(dose, Mapping) else dose
            parts, doses = self._parts_doses(p, d)
            if not parts:
                raise SCFMInputError(f"{p!r} is the control; name a perturbation.")
            out.append((self._label(parts), parts, doses))
        return out

    @torch.inference_mode()
    def _ood(self, idx, feats, dose, cells: dict | None) -> np.ndarray:
        parts = []
        for h, ref, sc in zip(
            self.heads, self.ood_ref_["embeddings"], self.ood_ref_["embed_scale"]
        ):
            e = h.embed(idx, feats, dose)
            parts.append(torch.cdist(e, ref).min(1).values / max(sc, 1e-8))
        score = torch.stack(parts).mean(0).numpy().astype(np.float64)
        if cells is not None:
            m = self._std(cells["z"]).mean(0, keepdim=True)
            cd = torch.cdist(m, self.ood_ref_["context_means"]).min().item()
            score = score + cd / max(self.ood_ref_["context_scale"], 1e-8)
        return score

    def ood_score(self, perturbations, adata_ctrl: AnnData | None = None, dose=None) -> pd.Series:
        """OOD score of each perturbation (and of ``adata_ctrl`` as its context).

        The perturbation part: the distance from its embedding to the nearest training
        perturbation's, over the median nearest-neighbour distance among the training
        ones, averaged over the members. The context part (when ``adata_ctrl`` is given):
        the distance from the mean standardised latent of those control cells to the
        nearest training context's control mean, over the median nearest-neighbour
        distance among training contexts (with one context, over the mean distance of its
        control cells from their mean). 0 for a training perturbation in a training
        context; about 1 for a request as far from the training ones as they are from
        each other.
        """
        self._check_trained()
        reqs = self._request_list(perturbations, dose)
        enc = self._encode_requests([(p, d) for _, p, d in reqs])
        cells = None
        if adata_ctrl is not None:
            cells = self._encode_cells(self._prepare_ctrl(adata_ctrl, None))
        return pd.Series(self._ood(*enc, cells), index=[r[0] for r in reqs], name="ood_score")

    def get_perturbation_embedding(self, perturbations, dose=None) -> pd.DataFrame:
        """Embeddings of perturbations: each member's embedding, concatenated
        (``n_ensemble * emb_dim`` columns; members are not aligned with each other)."""
        self._check_trained()
        reqs = self._request_list(perturbations, dose)
        idx, feats, dose_t = self._encode_requests([(p, d) for _, p, d in reqs])
        with torch.inference_mode():
            e = torch.cat([h.embed(idx, feats, dose_t) for h in self.heads], 1).numpy()
        cols = [
            f"m{m}_{j}" for m in range(len(self.heads)) for j in range(self.init_kwargs_["emb_dim"])
        ]
        return pd.DataFrame(e, index=[r[0] for r in reqs], columns=cols)

    def predict_perturbation(
        self,
        adata_ctrl: AnnData,
        perturbations: str | Sequence[str],
        *,
        covariates: Mapping[str, str] | None = None,
        dose=None,
        n_samples: int | None = None,
        seed: int | None = None,
        interval: float = 0.9,
        batch_size: int = 512,
    ) -> AnnData:
        """Predicted perturbed cells for each perturbation, from control cells.

        Parameters
        ----------
        adata_ctrl
            Control cells (raw counts, the model's genes). Cells whose perturbation column
            (if present) is not the control group are left out.
        perturbations
            Names such as ``"KLF1"`` or ``"KLF1+MAP2K6"`` (any order of parts); parts may be
            unseen in training if they have features.
        covariates
            ``{covariate: value}``: use only control cells with these values (or, for a
            column ``adata_ctrl`` lacks, label them so).
        dose
            A number, ``"a+b"`` (one per part, in the order the name gives them), or a dict
            perturbation → dose. Default 1 per part.
        n_samples
            Predicted cells per perturbation: control cells drawn with replacement. ``None``:
            one per control cell.
        seed
            Seed of the draws (``None``: torch's global RNG).
        interval
            Level of the intervals of the mean deltas (0.5 to 0.99).

        Returns
        -------
        AnnData
            ``X``: sampled counts (CSR float32); ``layers["scfm_expected"]``: expected
            counts; ``layers["scfm_lognorm"]``: predicted log1p(CP10k) expression (with
            ``counts="control_plus_change"``, each control cell's own plus its predicted
            change, free of rounding noise, as the shift baselines build their cells: it
            can fall below 0 where a gene the cell lacks goes down; with
            ``counts="decoded"``, ``X`` log-normalised); ``obs``: the perturbation
            column, the covariates, ``dose``,
            ``scfm_control_cell`` (the source cell), ``scfm_uncertainty`` (per cell: RMS
            over genes of the members' disagreement on its log-normalised expression,
            each member with its own anchors) and
            ``ood_score`` (per request, see :meth:`ood_score`). ``varm["scfm_delta"]``,
            ``varm["scfm_delta_lower"]``, ``varm["scfm_delta_upper"]``: genes x
            perturbations DataFrames of the predicted mean change of log-normalised
            expression (log1p CP10k) from the control cells and its interval.
            ``uns["scfm_perturbation"]``: parameters and OOD scores.

        Raises
        ------
        UnknownPerturbationError
            A part was never perturbed in training and has no features.
        GeneMismatchError
            ``adata_ctrl``'s genes differ from the model's.
        """
        self._check_trained()
        levels = self.calibration_["levels"]
        if not levels[0] <= interval <= levels[-1]:
            raise ValueError(
                f"interval must be within [{levels[0]}, {levels[-1]}], got {interval}."
            )
        q = float(np.interp(interval, levels, self.calibration_["quantiles"]))
        reqs = self._request_list(perturbations, dose)
        enc = self._encode_requests([(p, d) for _, p, d in reqs])
        ctrl = self._prepare_ctrl(adata_ctrl, covariates)
        cells = self._encode_cells(ctrl, batch_size=batch_size)
        ood = self._ood(*enc, cells)
        zs_all = self._std(cells["z"])
        x_ln = _lognorm_t(cells["x"])
        n = zs_all.shape[0]
        s = self.setup_
        ctx_all = self._context_index(context_labels(ctrl.obs, s["covariate_keys"]))
        dev = self.backbone.module.device
        ratio = self._bias_ratio(cells) if self.correct_bias_ else None
        obs_parts, xs, exps, lns, deltas, lows, highs = [], [], [], [], [], [], []
        with seeded(seed, dev), torch.inference_mode():
            for r, (label, _parts, doses) in enumerate(reqs):
                sel = (
                    np.arange(n)
                    if n_samples is None
                    else torch.randint(0, n, (int(n_samples),)).numpy()
                )
                zs = zs_all[sel]
                conds = {k: v[sel] for k, v in cells["conditions"].items()}
                lib = cells["library"][sel]
                request = (enc[0][r : r + 1], enc[1][r : r + 1], enc[2][r : r + 1])
                (expected, draw, lognorm), members = self._request_counts(
                    zs, lib, conds, cells["x"][sel], ctx_all[sel], request, ratio
                )
                ctrl_mean = x_ln[sel].mean(0)
                member_delta = np.stack([(ln.mean(0) - ctrl_mean).numpy() for _, _, ln in members])
                centre = member_delta.mean(0)
                own, spread = members, member_delta.std(0)
                if self.anchors_:
                    # the spread as calibrated: each member with its own anchors (fitted
                    # without its left-out units), so the anchor's uncertainty counts too
                    _, own = self._request_counts(
                        zs,
                        lib,
                        conds,
                        cells["x"][sel],
                        ctx_all[sel],
                        request,
                        ratio,
                        ensemble=False,
                        full=False,
                    )
                    spread = np.stack([(ln.mean(0) - ctrl_mean).numpy() for _, _, ln in own])
                    spread = spread.std(0)
                # per cell: the members' disagreement on its expected expression (with
                # anchors, each member's own: members that share one anchor and keep no
                # correction would otherwise always agree)
                member_ln = torch.stack([_lognorm_t(mu_m) for mu_m, _, _ in own])
                unc = member_ln.std(0).pow(2).mean(1).sqrt().numpy()
                half = q * (spread + self.gene_scale_ + 1e-3)
                deltas.append(centre)
                lows.append(centre - half)
                highs.append(centre + half)
                xs.append(sparse.csr_matrix(draw.numpy().astype(np.float32)))
                exps.append(expected.numpy().astype(np.float32))
                lns.append(lognorm.numpy().astype(np.float32))
                o = ctrl.obs.iloc[sel][[k for k in s["covariate_keys"]]].copy()
                o.insert(0, s["perturbation_key"], label)
                o["dose"] = s["combination_delimiter"].join(f"{v:g}" for v in doses)
                o[SLOTS.control_cell] = ctrl.obs_names[sel].to_numpy()
                o[SLOTS.uncertainty] = unc.astype(np.float32)
                o[SLOTS.ood_score] = float(ood[r])
                o.index = [f"{label}-{i}" for i in range(len(sel))]
                obs_parts.append(o)
        obs = pd.concat(obs_parts)
        obs[s["perturbation_key"]] = pd.Categorical(
            obs[s["perturbation_key"]], categories=[r[0] for r in reqs]
        )
        for key in s["covariate_keys"]:
            obs[key] = obs[key].astype("category")
        labels = [r[0] for r in reqs]
        uns = {
            "params": {
                "perturbations": labels,
                "covariates": {k: str(v) for k, v in (covariates or {}).items()},
                "n_samples": -1 if n_samples is None else int(n_samples),
                "seed": -1 if seed is None else int(seed),
                "interval": float(interval),
                "n_control_cells": int(n),
            },
            "ood_score": dict(zip(labels, map(float, ood))),
        }
        out = perturbation_anndata(
            xs, exps, obs, self.backbone.var_names_, labels, deltas, lows, highs, uns
        )
        out.layers[SLOTS.lognorm] = np.concatenate(lns)
        return out

    # ------------------------------------------------------------------ attributions
    def get_pathway_attributions(
        self,
        adata_ctrl: AnnData,
        perturbation: str,
        genes: Sequence[str] | None = None,
        n_top_genes: int = 20,
        dose=None,
        covariates: Mapping | None = None,
        n_steps: int = 32,
        batch_size: int = 128,
    ) -> pd.DataFrame:
        """Which pathway tokens of each control cell drive its predicted response to
        ``perturbation`` (backbones built with ``tokenizer="pathway"``).

        The explained number is the cell's predicted response on ``genes``: the mean over
        those genes of the predicted change of log-normalised expression (log1p CP10k),
        each signed by the direction of its mean predicted change, so up- and
        down-regulated genes both count as response. Default genes: the ``n_top_genes``
        with the largest mean predicted change over these cells. Integrated gradients
        with respect to the pathway tokens, from the average pretraining cell, of the
        ensemble's mean response.

        Returns
        -------
        pandas.DataFrame
            Control cells × pathways; each row sums to the response's change from the
            baseline, up to ``attrs["completeness_gap"]``; ``attrs["genes"]`` and
            ``attrs["signs"]`` hold the explained genes and their directions.
        """
        self._check_trained()
        bb = self.backbone
        bb._require_pathways()
        (req,) = self._request_list([perturbation], dose)
        idx, feats, dose_t = self._encode_requests([(req[1], req[2])])
        ctrl = self._prepare_ctrl(adata_ctrl, covariates)
        module = bb.module
        dev = module.device
        heads = [copy.deepcopy(h).to(dev).eval() for h in self.heads]
        embeds = [h.embed(idx.to(dev), feats.to(dev), dose_t.to(dev))[0] for h in heads]
        weights = self.correction_weights_ or [1.0] * len(heads)
        shift = torch.zeros(())  # the anchors' shift: one per context, so one context here
        ctx = self._context_index(context_labels(ctrl.obs, self.setup_["covariate_keys"]))
        if (self.anchors_ or self._is_flow()) and len(torch.unique(ctx)) > 1:
            raise SCFMInputError(
                "adata_ctrl holds control cells of several contexts; pass covariates=... "
                "to explain one context's response at a time."
            )
        if self.anchors_:
            full = self.full_anchors_["latent"]
            shift = self._anchor_shift(full, idx, feats, dose_t, ctx[:1], 1)[0]
        # with an expression anchor the explained change starts where its shift ends: at
        # the latent shift of the parts it shifts in expression (all but those whose
        # arithmetic is decoded from the latent, whose change differs from cell to cell)
        ref = shift
        if self.anchors_ and self.arithmetic_space_ == "latent":
            full = self.full_anchors_["latent"]
            ref = shift - self._anchor_shift(full, idx, feats, dose_t, ctx[:1], 1, "arithmetic")[0]
        shift, ref = shift.to(dev), ref.to(dev)
        z_mean, z_std = self.z_mean_.to(dev), self.z_std_.to(dev)
        shape = (-1, module.n_tokens, module.token_dim)

        expression = self.init_kwargs_.get("anchor") == "expression"

        def response(features, tensors):  # (B, G) predicted change of log1p CP10k
            z = module.encoder.head(features).chunk(2, -1)[0]  # (B, T, d) posterior mean
            zs = (z.flatten(1) - z_mean) / z_std
            if self._is_flow():  # a flow starts at the anchor, in the cells' context
                moves = [h(zs + shift, e, ctx[:1].to(dev)) for h, e in zip(heads, embeds)]
            else:
                moves = [h(zs, e) for h, e in zip(heads, embeds)]
            delta = shift + torch.stack([w * m for m, w in zip(moves, weights)]).mean(0)
            z_pert = ((zs + delta) * z_std + z_mean).view(shape)
            conds = module.conditions(tensors)
            lib = tensors["X"].sum(-1, keepdim=True)
            mu_p = module.decode(z_pert, lib, conds).mean
            if expression:  # the decoded change on top of the shifted expression (whose
                # shift is the same for every cell of the context, so explains nothing)
                z = ((zs + ref) * z_std + z_mean).view(shape)
            mu_c = module.decode(z, lib, conds).mean
            return _lognorm_t(mu_p) - _lognorm_t(mu_c)

        names = list(map(str, bb.var_names_))
        if genes is None:
            with torch.no_grad():
                total = torch.zeros(len(names), device=dev)
                for tensors in bb._batches(ctrl, None, batch_size):
                    x_norm, _ = module.normalize(tensors["X"].float(), tensors.get("batch"))
                    total += response(module.encoder.features(x_norm), tensors).sum(0)
            order = torch.argsort(total.abs(), descending=True, stable=True)[:n_top_genes]
            gene_idx = order.cpu()
            signs = torch.sign(total[order]).cpu()
        else:
            missing = [g for g in genes if g not in names]
            if missing or not genes:
                raise SCFMInputError(
                    f"genes {missing[:5] or '[]'} are not the model's genes; name genes of "
                    "model.backbone.var_names_."
                )
            gene_idx = torch.as_tensor([names.index(g) for g in genes])
            signs = torch.ones(len(genes))
        gi, sg = gene_idx.to(dev), signs.to(dev)
        sg = torch.where(sg == 0, torch.ones_like(sg), sg)  # a gene that does not move: +1

        def target(features, tensors, x_norm):
            return (response(features, tensors)[:, gi] * sg).mean(1)

        df = pathway_attributions(
            module,
            bb._batches(ctrl, None, batch_size),
            target,
            bb.pathway_names_,
            ctrl.obs_names,
            n_steps,
        )
        df.attrs["genes"] = [names[i] for i in gene_idx.tolist()]
        df.attrs["signs"] = sg.cpu().numpy()
        df.attrs["perturbation"] = req[0]
        return df

    # ------------------------------------------------------------------ save / load
    def _checkpoint_config(self) -> dict:
        """The backbone's config, the design (registry), the heads' sizes, the training
        units and the calibration."""
        self._check_trained()
        return {
            "backbone": {"model": "SCFM", **self.backbone._checkpoint_config()},
            "registry": self.registry_,
            "init_kwargs": self.init_kwargs_,
            "pretrained": self.pretrained_,
            "correct_decoder_bias": self.correct_bias_,
            "head_shape": {
                "latent_dim": int(self.z_mean_.numel()),
                "n_features": 0 if self.features_ is None else int(self.features_.shape[1]),
                "n_parts": len(self.vocab_),
            },
            "vocab": list(self.vocab_),
            "contexts": self.contexts_,
            "correction_weights": self.correction_weights_,
            "arithmetic_space": self.arithmetic_space_,
            "decoded_change": self.decoded_change_,
            "arithmetic_validation": self.arithmetic_validation_,
            "flow_prior": self.flow_prior_,
            "flow_contexts": self.flow_contexts_,
            "guidance": self.guidance_,
            "units": self.units_,
            "oob": self.oob_,
            "calibration": self.calibration_,
            "embed_scale": self.ood_ref_["embed_scale"],
            "context_scale": self.ood_ref_["context_scale"],
            "feature_names": None
            if self.features_ is None
            else [list(map(str, self.features_.index)), list(map(str, self.features_.columns))],
            "history": self.history_,
        }

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors (prefixed ``backbone.``), every head, the latent
        standardisation, the OOD references and the features table."""
        state = {_BACKBONE + k: v for k, v in self.backbone._checkpoint_state().items()}
        state.update(
            {f"head{m}.{k}": v for m, h in enumerate(self.heads) for k, v in h.state_dict().items()}
        )
        state.update(
            {
                f"{kind}{m}.{k}": v
                for kind, anchors in (
                    ("anchor", self.anchors_),
                    ("expression_anchor", self.expression_anchors_),
                )
                for m, a in enumerate(anchors)
                for k, v in a.state_dict().items()
            }
        )
        state.update(
            {
                f"full_{where}_anchor.{k}": v
                for where, a in self.full_anchors_.items()
                for k, v in a.state_dict().items()
            }
        )
        state["z_mean"], state["z_std"] = self.z_mean_, self.z_std_
        state["context_means"] = self.ood_ref_["context_means"]
        for m, e in enumerate(self.ood_ref_["embeddings"]):
            state[f"ood_embed{m}"] = e
        state["gene_scale"] = torch.as_tensor(self.gene_scale_, dtype=torch.float32)
        if self.features_ is not None:
            state["features"] = torch.as_tensor(self.features_.to_numpy())
        return state

    @classmethod
    def _read_checkpoint(cls, dir_path) -> tuple[dict, dict]:
        """Also reads the layout of earlier saves: the backbone in ``backbone/`` and the
        heads in ``response/``, two checkpoint folders, with the design in ``"setup"``."""
        path = Path(dir_path)
        if not (path / "response").is_dir() or (path / "config.json").exists():
            return read_checkpoint(path)
        state, config = read_checkpoint(path / "response")
        backbone_state, backbone_config = read_checkpoint(path / "backbone")
        state.update({_BACKBONE + k: v for k, v in backbone_state.items()})
        registry = _registry_of_two_folders(backbone_config["registry"], config["setup"])
        return state, {**config, "backbone": backbone_config, "registry": registry}

    @classmethod
    def _from_checkpoint(cls, where, state: dict, config: dict, adata) -> PerturbationModel:
        backbone_state = {
            k[len(_BACKBONE) :]: state.pop(k) for k in list(state) if k.startswith(_BACKBONE)
        }
        backbone = SCFM._from_checkpoint(where, backbone_state, config["backbone"], adata)
        registry = config["registry"]
        if adata is not None:
            args = registry["setup_args"]
            cls.setup_anndata(
                backbone.adata, **{k: args[k] for k in SETUP_KEYS}, source_registry=registry
            )
        model = cls(
            None if adata is None else backbone.adata,
            registry=registry,
            _backbone=backbone,
            # saves from before the anchors record none: they are the heads alone; from
            # before attention pooling, every part was summed
            **{"anchor": None, "part_pool": "sum", **config["init_kwargs"]},
        )
        model.pretrained_ = bool(config["pretrained"])
        model.correct_bias_ = bool(config.get("correct_decoder_bias", False))
        model._features_arg = None
        names = config["feature_names"]
        model.features_ = (
            None
            if names is None
            else pd.DataFrame(state.pop("features").numpy(), index=names[0], columns=names[1])
        )
        model._feature_index = {} if names is None else {g: i for i, g in enumerate(names[0])}
        model.vocab_ = {p: i for i, p in enumerate(config["vocab"])}
        model.units_ = config["units"]
        model.oob_ = config["oob"]
        model.calibration_ = config["calibration"]
        model.history_ = config.get("history", {})
        model.z_mean_, model.z_std_ = state.pop("z_mean"), state.pop("z_std")
        model.gene_scale_ = state.pop("gene_scale").numpy()
        k = model.init_kwargs_["n_ensemble"]
        model.ood_ref_ = {
            "context_means": state.pop("context_means"),
            "embeddings": [state.pop(f"ood_embed{m}") for m in range(k)],
            "embed_scale": config["embed_scale"],
            "context_scale": config["context_scale"],
        }
        shape = config["head_shape"]
        model.flow_prior_ = bool(config.get("flow_prior", False))
        # saves before these: flows without the context, guidance 1
        model.flow_contexts_ = bool(config.get("flow_contexts", False))
        model.guidance_ = float(config.get("guidance", 1.0))
        # Saves before the anchors: no contexts recorded, every member keeps its whole head.
        model.contexts_ = list(config.get("contexts", []))
        for m in range(k):
            h = model._new_head(shape["latent_dim"], shape["n_features"], shape["n_parts"])
            prefix = f"head{m}."
            h.load_state_dict(
                {kk[len(prefix) :]: v for kk, v in state.items() if kk.startswith(prefix)},
                strict=True,
            )
            h.eval()
            model.heads.append(h)
        model.correction_weights_ = [float(w) for w in config.get("correction_weights", [1.0] * k)]
        # saves before the choice: the arithmetic rule in expression
        model.arithmetic_space_ = config.get("arithmetic_space", "expression")
        model.decoded_change_ = config.get("decoded_change", "log_ratio")
        model.arithmetic_validation_ = config.get("arithmetic_validation", {})
        where = model.init_kwargs_.get("anchor")
        spaces = {"latent": ("anchor", model.anchors_, shape["latent_dim"])}
        if where == "expression":
            spaces["expression"] = (
                "expression_anchor",
                model.expression_anchors_,
                len(model.var_names_),
            )

        def anchor_at(prefix: str, dim: int) -> LatentAnchor:
            a = LatentAnchor(dim, shape["n_parts"], len(model.contexts_), shape["n_features"])
            a.load_state_dict(
                {kk[len(prefix) :]: v for kk, v in state.items() if kk.startswith(prefix)},
                strict=True,
            )
            return a.eval()

        for space, (kind, anchors, dim) in spaces.items() if where else ():
            anchors.extend(anchor_at(f"{kind}{m}.", dim) for m in range(k))
            model.full_anchors_[space] = anchor_at(f"full_{space}_anchor.", dim)
        model.is_trained_ = True
        return model

    def _summary(self) -> str:
        s = self.setup_
        state = "trained" if self.is_trained_ else "not trained"
        n_units = len(getattr(self, "units_", []))
        origin = (
            f"pretrained + {self.init_kwargs_['adapt_strategy']}"
            if self.pretrained_
            else "trained on the data"
        )
        return (
            f"PerturbationModel ({state}): perturbation_key={s['perturbation_key']!r}, "
            f"control={s['control_group']!r}, contexts={s['covariate_keys']}, "
            f"{n_units} training units, {self.init_kwargs_['n_ensemble']} ensemble members, "
            f"backbone {type(self.backbone).__name__} ({origin})."
        )


def _registry_of_two_folders(backbone_registry: dict, setup: dict) -> dict:
    """The registry a PerturbationModel saved in the two-folder layout did not record: its
    fields (the counts and the batch) are its backbone's, its setup is the ``setup`` it
    kept in ``response/config.json``."""
    keep = (REGISTRY_KEYS.X_KEY, REGISTRY_KEYS.BATCH_KEY)
    registry = copy.deepcopy(backbone_registry)
    registry["model_name"] = "PerturbationModel"
    registry["setup_method_name"] = "setup_anndata"
    registry["setup_args"] = {k: setup[k] for k in SETUP_KEYS}
    registry["field_registries"] = {
        k: v for k, v in registry["field_registries"].items() if k in keep
    }
    return registry


def choose_guidance(errors: np.ndarray, guidances) -> tuple[float, float]:
    """``(guidance, share)`` from out-of-bag errors ``(n, len(guidances),
    len(CORRECTION_GRID))``: the guidance scale whose best non-zero share has the least
    mean error, then its share by :func:`choose_correction` (the one-standard-error rule
    against the anchor alone). Where no share is kept the scale is moot: the first."""
    if errors.shape[0] == 0:
        return float(guidances[0]), 0.0
    means = errors.mean(0)  # (n_guidance, n_shares)
    g = int(np.argmin(means[:, 1:].min(1))) if errors.shape[2] > 1 else 0
    share = choose_correction(errors[:, g])
    return (float(guidances[g]) if share else float(guidances[0])), share


def choose_correction(errors: np.ndarray) -> float:
    """The share of the heads' correction the ensemble keeps, from out-of-bag errors
    ``(n, len(CORRECTION_GRID))`` (one row per member and unit it left out): the share of
    least mean error, kept only when it beats the anchor alone (share 0) by more than one
    standard error of the paired differences (the one-standard-error rule: a correction
    that wins by less is not told apart from none); else 0."""
    if errors.shape[0] < 2:
        return 0.0
    best = int(np.argmin(errors.mean(0)))
    gain = errors[:, 0] - errors[:, best]
    se = gain.std(ddof=1) / np.sqrt(len(gain))
    return float(CORRECTION_GRID[best]) if gain.mean() > se else 0.0


def _ln_change(ln_start, mu, mu0, scale, form: str = "log_ratio", ln0=None) -> torch.Tensor:
    """The change ``(N, G)`` of each cell's log1p(CP10k) expression that a decoded change
    of its expected counts ``mu0`` → ``mu`` makes. ``ln_start``: the cell's own
    log-normalised expression; ``scale``: CP10k per count of the cell, ``(N, 1)``.

    ``"log_ratio"``: the change of the decoded means' log-normalised values (``ln0``:
    those of ``mu0``, when already computed). ``"counts"``: the change of the cell's
    log-normalised counts when the change of the means is added to its counts (the
    expected counts of ``counts="control_plus_change"``), so a gene the cell lacks moves
    by what its new counts are worth, not by the ratio of two small means. Both are
    exactly 0 where ``mu == mu0``.
    """
    if form == "counts":
        start = torch.expm1(ln_start).clamp(min=0) / scale
        return torch.log1p(scale * (start + mu - mu0).clamp(min=0)) - torch.log1p(scale * start)
    return _lognorm_t(mu) - (_lognorm_t(mu0) if ln0 is None else ln0)


def _round_counts(expected: torch.Tensor) -> torch.Tensor:
    """Counts drawn from ``expected`` (non-integer) counts: each rounded down or up at
    random with the chance that keeps its mean (and so the cell's library)."""
    low = expected.floor()
    return low + (torch.rand(expected.shape) < expected - low).to(expected.dtype)


def _in_bag(n_units: int, oob) -> list[int]:
    """The units an ensemble member trains on: all but its left-out ones (all, when it
    left out every unit)."""
    left_out = set(oob)
    return [i for i in range(n_units) if i not in left_out] or list(range(n_units))


def _training_units(design: pd.DataFrame) -> tuple[list, list[np.ndarray], dict]:
    """The training units of a cell design (one per context, parts and doses with control
    cells in its context): ``(units, cells of each unit, control cells of each context)``."""
    is_ctrl = design["parts"].map(len).to_numpy() == 0
    ctrl_idx = {
        c: np.flatnonzero(is_ctrl & (design["context"].to_numpy() == c))
        for c in design["context"].unique()
    }
    ctrl_idx = {c: i for c, i in ctrl_idx.items() if i.size}
    groups = pd.Series(range(len(design)))[~is_ctrl].groupby(
        [
            design["context"].to_numpy()[~is_ctrl],
            design["parts"].to_numpy()[~is_ctrl],
            design["doses"].to_numpy()[~is_ctrl],
        ]
    )
    units, unit_idx, dropped = [], [], []
    for key, idx in groups.indices.items():
        if key[0] not in ctrl_idx:
            dropped.append(key)
            continue
        units.append(key)
        unit_idx.append(np.asarray(groups.obj.to_numpy()[idx]))
    if dropped:
        logger.warning(
            "%d units have no control cells in their context and are not used: %s",
            len(dropped),
            dropped[:5],
        )
    if not units:
        raise ValueError(
            "No training unit: every perturbed cell's context lacks control cells. Each "
            "context (covariate_keys) needs its own controls."
        )
    return units, unit_idx, ctrl_idx


def _rescaled(dist, ratio: torch.Tensor):
    """The same count distribution with its mean multiplied by ``ratio`` per gene, each cell
    rescaled back to its original total mean (library)."""
    from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
    from torch.distributions import Poisson

    if isinstance(dist, Poisson):
        rate = dist.rate * ratio
        return Poisson(rate * dist.rate.sum(-1, keepdim=True) / rate.sum(-1, keepdim=True))
    mu = dist.mu * ratio
    mu = mu * dist.mu.sum(-1, keepdim=True) / mu.sum(-1, keepdim=True).clamp(min=1e-8)
    if isinstance(dist, ZeroInflatedNegativeBinomial):
        return ZeroInflatedNegativeBinomial(mu=mu, theta=dist.theta, zi_logits=dist.zi_logits)
    return NegativeBinomial(mu=mu, theta=dist.theta)


def response_scores(adata: AnnData, setup: Mapping, max_cells: int = 2000) -> np.ndarray:
    """Each gene's mean absolute response to the training perturbations.

    For every (perturbation, context) with perturbed and control cells, the change of the
    mean log-normalised expression (log1p CP10k) from the context's control cells; the
    score is the mean over those of the absolute change. At most ``max_cells`` random cells
    of each group are read.
    """
    from ._tokenizers import lognorm_sample

    obs = adata.obs
    pert = obs[setup["perturbation_key"]].astype(str).to_numpy()
    ctx = context_labels(obs, setup.get("covariate_keys") or [])
    is_ctrl = pert == str(setup["control_group"])
    x = get_matrix(adata, setup.get("layer"))
    rng = np.random.default_rng(0)

    def mean_of(mask: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(mask)
        if idx.size > max_cells:
            idx = np.sort(rng.choice(idx, max_cells, replace=False))
        m = lognorm_sample(x[idx], max_cells=idx.size)
        return np.asarray(m.mean(0), dtype=np.float64).ravel()

    total, n, skipped = np.zeros(adata.n_vars), 0, 0
    for c in pd.unique(ctx):
        in_c = ctx == c
        perts = pd.unique(pert[in_c & ~is_ctrl])
        if not (in_c & is_ctrl).any():
            skipped += len(perts)
            continue
        base = mean_of(in_c & is_ctrl)
        for p in perts:
            total += np.abs(mean_of(in_c & (pert == p)) - base)
            n += 1
    logger.info(
        "Gene response scores from %d (perturbation, context) pairs; %d skipped (no control "
        "cells in their context).",
        n,
        skipped,
    )
    if n == 0:
        raise SCFMInputError(
            "No context has both control and perturbed cells, so no gene's response can be "
            "measured; pass tokenizer_kwargs={'gene_scores': ...} or 'n_ranked': 0."
        )
    return total / n


def _response_ranked_pathways(adata: AnnData, setup: Mapping, kwargs: dict) -> dict:
    """A pathway backbone's SCFM arguments with ``n_ranked`` gene sets (default 16) ranked
    first by their genes' scores: the caller's ``gene_scores``, or else the training
    perturbations' response. ``n_ranked=0`` leaves the choice to coverage alone."""
    from ._tokenizers import N_RESPONSE_RANKED

    kw = dict(kwargs.get("tokenizer_kwargs") or {})
    kw.setdefault("n_ranked", N_RESPONSE_RANKED)
    if kw["n_ranked"] and "gene_scores" not in kw:
        kw["gene_scores"] = response_scores(adata, setup)
    return {**kwargs, "tokenizer_kwargs": kw}

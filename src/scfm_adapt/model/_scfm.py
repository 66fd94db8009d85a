"""``SCFM``: the single-cell foundation model (token VAE + DiT prior) on an AnnData or MuData."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    NumericalJointObsField,
)

from ..data import (
    batch_mask_matrix,
    check_genes,
    check_layer_counts,
    check_not_view,
    check_obs_keys,
    check_unique_names,
    matrix_sums,
    read_batch_gene_masks,
    row_blocks,
)
from ..errors import CheckpointError, ModalityError, SCFMInputError
from ..module import ENCODER_RANK, MODULE_KEYS, SCFMModule
from ..train import DEFAULT_GRADIENT_CLIP, PRIOR_GRADIENT_CLIP, SCFMTrainingPlan
from ._adapters import AdaptationMixin
from ._generation import GenerationMixin
from ._multimodal import MultimodalMixin, is_mudata
from ._quantization import QuantizationMixin
from ._query_mapping import QueryMappingMixin
from ._tokenizers import TokenizerMixin
from .base import BaseModel, inference_only, transfer_errors

logger = logging.getLogger(__name__)

STAGES = ("vae", "prior")
#: Cells per batch when embedding with no ``batch_size`` given: the encoder alone is light,
#: and larger batches amortise the per-batch cost of loading and of small matmuls
#: (``benchmarks/throughput.py --infer-batch-size``).
INFERENCE_BATCH_SIZE = 1024
#: Optimiser steps of the DiT prior by default (see ``SCFM.train``'s ``prior_steps``).
PRIOR_STEPS = 12_000


def _uses_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` argument means training on a CUDA device."""
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def _device_count(devices) -> int:
    """At least the number of devices Lightning's ``devices`` argument trains on (an upper
    bound for ``"auto"`` / ``-1``: every visible GPU)."""
    if isinstance(devices, list | tuple):
        return max(len(devices), 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    return max(torch.cuda.device_count(), 1)


def _data_parallel_strategy(accelerator, devices) -> str | None:
    """The DDP strategy to name when training on several devices (``None`` for one).

    Lightning picks DDP by itself for several devices, but scvi-tools chooses its
    distributed batch sampler from the strategy *named* in the trainer arguments: unnamed,
    Lightning wraps scvi-tools' batch sampler in its own and each process gets batches of
    batches. In a notebook the DDP that Lightning allows is ``"ddp_notebook"``.
    """
    explicit = isinstance(devices, list | tuple) or (
        isinstance(devices, int | str) and str(devices).strip().isdigit()
    )
    if explicit:
        several = _device_count(devices) > 1
    else:  # "auto" / -1: every visible GPU, unless training on the CPU
        several = accelerator != "cpu" and torch.cuda.device_count() > 1
    if not several:
        return None
    import sys

    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)  # Lightning's own test
    return "ddp_notebook" if interactive else "ddp"


def prior_epochs(n_obs: int, prior_steps: int, batch_size: int, devices, train_size=0.9,
                 validation_size=None) -> int:  # fmt: skip
    """Epochs that hold ``prior_steps`` optimiser steps of the prior on ``n_obs`` cells
    (its training split, over the devices given): the bound of a budget in steps."""
    from scvi.dataloaders._data_splitting import validate_data_split

    n_train, _ = validate_data_split(n_obs, train_size, validation_size)
    per_epoch = math.ceil(n_train / (batch_size * _device_count(devices)))
    return max(1, math.ceil(prior_steps / max(per_epoch, 1)))


def _columns(names: np.ndarray, wanted: Sequence[str] | None, what: str) -> np.ndarray:
    """Positions of ``wanted`` among ``names`` (all when ``None``); KeyError on unknowns."""
    if wanted is None:
        return np.arange(len(names))
    known = set(names)
    missing = [g for g in wanted if g not in known]
    if missing:
        raise KeyError(f"{what}: {missing[:5]} ...")
    return pd.Index(names).get_indexer(list(wanted))


def _expression_frame(values, adata, indices, columns, return_numpy: bool):
    """``values`` as returned by ``get_normalized_expression``: array or cells × features."""
    if return_numpy:
        return values
    obs = adata.obs_names if indices is None else adata.obs_names[np.asarray(indices)]
    return pd.DataFrame(values, index=obs, columns=columns)


class SCFM(
    QuantizationMixin,
    TokenizerMixin,
    MultimodalMixin,
    GenerationMixin,
    QueryMappingMixin,
    AdaptationMixin,
    BaseModel,
):
    """Single-cell foundation model: latent-token VAE over counts plus a DiT prior.

    Stage 1 encodes each cell's counts into ``n_tokens`` latent tokens and decodes them with
    an NB, ZINB or Poisson likelihood (library size and dispersion live in the decoder).
    Stage 2 trains a Diffusion Transformer over those tokens, conditioned on the registered
    covariates through adaLN-Zero, with a null condition for classifier-free guidance.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    gene_likelihood
        ``"nb"`` (default), ``"zinb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` (default) or ``"gene-batch"``.
    n_tokens, token_dim
        Each cell's latent is ``n_tokens`` tokens of width ``token_dim``.
    tokenizer
        How the encoder reads a cell (the latent keeps its shape whichever is chosen):

        * ``"latent"`` (default): one linear map of all genes to ``n_tokens`` tokens.
        * ``"pathway"``: one token per gene set (``gene_sets``); attributions read as
          pathways (:meth:`get_pathway_attributions`).
        * ``"rank"``: the cell's top-``k`` genes by normalised expression (divided by each
          gene's median over expressing training cells), in rank order, as gene-id tokens
          with learned gene embeddings (Geneformer's input).
        * ``"geneformer"``: an external Geneformer-style BERT loaded from the local folder
          ``backbone``; its weights stay frozen unless an adapter trains them.
        * ``"scgpt"``: scGPT's transformer loaded from the local folder ``backbone``
          (``args.json``, ``vocab.json``, ``best_model.pt``); frozen likewise. Each cell's
          expressed genes in its vocabulary, with their per-cell value bins, after a
          ``<cls>`` token.

        Learned queries pool the tokens into the latent (Perceiver-style).
    gene_sets
        ``tokenizer="pathway"``: ``"go"`` (default; GO biological processes from the data
        folder's GO tables), ``"go_mf"``, ``"go_cc"``, a ``.gmt`` path or a dict of set name
        to genes; fitted to the genes by :func:`~scfm_adapt.data.select_gene_sets`. Genes in
        no chosen set go to catch-all tokens (``n_residual``).
    gene_graph
        Restricts attention between gene (``"rank"``) or pathway (``"pathway"``) tokens:
        ``"go"`` (genes sharing a specific GO term), a genes × genes matrix or an edge list
        of gene names. Pathway tokens attend along sets that overlap or are linked by an
        edge.
    backbone
        ``tokenizer="geneformer"`` or ``"scgpt"``: the checkpoint folder. The saved model
        keeps the weights it was built with; :attr:`backbone_info_` (also in the model
        card) records the folder, the weights file's SHA-256, the genes found in the
        vocabulary and the share of the counts they carry.
    tokenizer_kwargs
        Options: ``pathway``: ``min_size`` (10), ``max_size`` (300), ``max_sets`` (64),
        ``max_overlap`` (0.5), ``n_ranked`` (0; a :class:`PerturbationModel`'s backbone:
        16) and ``gene_scores`` (an ``adata.var`` column or one number per gene; default
        the genes' variance; a :class:`PerturbationModel`'s backbone: their response to
        the training perturbations): that many sets are chosen first by their members'
        mean score, :func:`~scfm_adapt.data.select_gene_sets`; ``go_propagate`` (False;
        True gives each GO term the genes of the terms below it), ``n_channels`` (4),
        ``member_init`` (``"random"``, or ``"pca"``: the member weights start at the sets'
        principal axes, :func:`~scfm_adapt.data.set_components`), ``min_jaccard`` (0.05),
        ``min_edge_share`` (0.1: with ``gene_graph``, the share of member pairs joined by
        edges that links two sets, :func:`~scfm_adapt.data.set_graph`),
        ``sparse_threshold`` (0: graph attention on the fused kernel with a mask),
        ``n_residual`` (8: the genes in no set are split into that many expression
        programmes, :func:`~scfm_adapt.data.residual_programmes`; 1: one catch-all token);
        ``rank``:
        ``top_k`` (64); ``geneformer``: ``gene_id_key`` (an ``adata.var`` column of
        Ensembl ids), ``min_vocab_fraction`` (0.5), ``token_dictionary``, ``gene_medians``
        (files, when not in the folder), ``backbone_dropout`` (0: the frozen BERT reads
        every cell the same way; the checkpoint's own is worth passing when its weights are
        fine-tuned); ``scgpt``: ``gene_id_key`` (a column of gene
        symbols), ``min_vocab_fraction`` (0.5), ``max_len`` (genes per cell; default the
        model's ``max_seq_len - 1``), ``cls_value`` (default ``pad_value``, as scGPT),
        ``tie_break`` (``"middle"``: a value on equal bin edges gets the middle bin, the
        same every time; ``"random"``: scGPT's draw), ``backbone_dropout`` (0: the frozen
        backbone reads every cell the same way; scGPT trained with 0.2, worth passing
        when its own weights are fine-tuned); any graph: ``go_max_term_size`` (50).
    tokenizer_options
        The resolved options (set by :meth:`load`; not for users).
    **module_kwargs
        Further sizes passed to :class:`~scfm_adapt.module.SCFMModule` (``encoder_hidden``,
        ``encoder_depth``, ``decoder_hidden``, ``dit_hidden``, ``dit_depth``, ``p_uncond`` ...).

    Examples
    --------
    >>> import scfm_adapt as sfa
    >>> adata = sfa.datasets.pbmc68k()
    >>> sfa.model.SCFM.setup_anndata(adata, labels_key="bulk_labels")
    >>> model = sfa.model.SCFM(adata)
    >>> model.train(max_epochs=50)
    >>> sfa.tl.embed(adata, model)  # adata.obsm["X_scfm"]
    """

    _module_cls = SCFMModule
    _training_plan_cls = SCFMTrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        gene_likelihood: Literal["nb", "zinb", "poisson"] = "nb",
        dispersion: Literal["gene", "gene-batch"] = "gene",
        n_tokens: int = 8,
        token_dim: int = 16,
        tokenizer: Literal["latent", "pathway", "rank", "geneformer", "scgpt"] = "latent",
        gene_sets=None,
        gene_graph=None,
        backbone: str | Path | None = None,
        tokenizer_kwargs: dict | None = None,
        tokenizer_options: dict | None = None,
        registry: dict | None = None,
        var_names: Sequence[str] | None = None,
        modality_var_names: dict[str, Sequence[str]] | None = None,
        **module_kwargs,
    ):
        super().__init__(adata, registry=registry)
        self.init_kwargs_ = {
            "gene_likelihood": gene_likelihood,
            "dispersion": dispersion,
            "n_tokens": n_tokens,
            "token_dim": token_dim,
            # Recorded, so that a save rebuilds the same gene map whatever the default.
            "encoder_rank": module_kwargs.pop("encoder_rank", ENCODER_RANK),
            **module_kwargs,
        }
        if adata is not None and is_mudata(adata):
            var_names = adata.mod[self.modalities_["rna"]].var_names
            modality_var_names = self._modality_var_names(adata)
        elif adata is not None:
            var_names = adata.var_names
        self.var_names_ = [str(g) for g in var_names]
        self.modality_var_names_ = {
            k: [str(v) for v in vs] for k, vs in (modality_var_names or {}).items()
        }
        fill = None
        if tokenizer != "latent" and tokenizer_options is None:
            if adata is None or self.is_multimodal:
                raise SCFMInputError(
                    f"tokenizer={tokenizer!r} is built from the training data: pass the "
                    "AnnData it trains on (MuData models use the default 'latent' tokenizer)."
                )
            tokenizer_options, fill = self._resolve_tokenizer(
                adata, tokenizer, gene_sets, gene_graph, backbone, tokenizer_kwargs
            )
        elif tokenizer == "latent":
            given = {"gene_sets": gene_sets, "gene_graph": gene_graph, "backbone": backbone}
            given = [k for k, v in {**given, "tokenizer_kwargs": tokenizer_kwargs}.items() if v]
            if given:
                raise SCFMInputError(
                    f"{given} configure another tokenizer than the default 'latent': pass "
                    "tokenizer='pathway' (gene_sets, gene_graph), 'rank' (gene_graph) or "
                    "'geneformer' or 'scgpt' (backbone) as well."
                )
        if tokenizer != "latent":
            self.init_kwargs_["tokenizer"] = tokenizer
            self.init_kwargs_["tokenizer_options"] = tokenizer_options
        # genes each batch lacks (data sets with different gene panels, see pretrain)
        self.batch_gene_masks_: dict[str, list[int]] | None = None
        if adata is not None and not is_mudata(adata):
            self.batch_gene_masks_ = read_batch_gene_masks(
                adata, self.registry_["setup_args"].get("batch_key")
            )
        self.module = self._make_module()
        if fill:
            self._fill_tokenizer(fill)
        self.trained_stages_: list[str] = []
        self.histories_: dict[str, dict] = {}
        self.init_params_ = self._get_init_params(locals())

    def _make_module(self, extension: dict | None = None) -> SCFMModule:
        """A fresh module for the registry; ``extension`` categories are added as new rows
        on top of a module of the pretrained sizes (query models, see load_query_data)."""
        sizes = self._registry_sizes()
        ext = extension or {"batch": 0, "labels": 0, "cat_covs": [0] * len(sizes["cat_covs"])}
        module_cls, kwargs = self._multimodal_module_kwargs(self.init_kwargs_)
        module = (module_cls or self._module_cls)(
            n_input=self.summary_stats.n_vars,
            n_batch=sizes["batch"] - ext["batch"],
            n_labels=sizes["labels"] - ext["labels"],
            n_cats_per_cov=[a - b for a, b in zip(sizes["cat_covs"], ext["cat_covs"])],
            n_continuous_cov=self.summary_stats.get("n_extra_continuous_covs", 0),
            **kwargs,
        )
        self._set_protein_mask(module)
        if extension:
            module.extend_categories(ext["batch"], ext["labels"], ext["cat_covs"])
        self._set_batch_gene_masks(module)
        return module

    def _batch_categories(self) -> list[str]:
        state = self.registry_["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"]
        return [str(c) for c in state["categorical_mapping"]]

    def _set_batch_gene_masks(self, module) -> None:
        """Give the module the gene panel of each of its batches (``batch_gene_masks_``)."""
        masks = getattr(self, "batch_gene_masks_", None)
        batches = self._batch_categories()[: module.n_batch]
        absent = sorted(set(masks or {}) - set(batches))
        if absent:  # e.g. a subset of the data without some files' cells
            logger.info("No cells of batches %s here: their gene panels are not used.", absent)
        matrix = batch_mask_matrix(masks, batches, module.n_input)  # absent ones left out
        module.set_batch_gene_mask(None if matrix is None else torch.as_tensor(matrix))

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData's counts and covariates with the model class.

        Parameters
        ----------
        adata
            Cells × genes with raw counts in ``X`` or ``layers[layer]``.
        layer
            Layer holding raw counts; ``None`` uses ``X``.
        batch_key
            ``obs`` column of batches (decoder covariate and prior condition).
        labels_key
            ``obs`` column of cell labels (prior condition, used by annotation).
        categorical_covariate_keys, continuous_covariate_keys
            Further ``obs`` columns; categorical ones condition the decoder and the prior,
            continuous ones the prior.

        Raises
        ------
        InvalidCountsError
            When the counts are non-integer, negative, NaN/inf, or the AnnData is empty.
        KeyError
            When a named layer or ``obs`` column does not exist.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_obs_keys(
            adata.obs,
            [
                batch_key,
                labels_key,
                *(categorical_covariate_keys or []),
                *(continuous_covariate_keys or []),
            ],
        )
        check_not_view(adata)
        check_layer_counts(adata, layer)
        check_unique_names(adata)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            NumericalJointObsField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
        ]
        cls._register(adata, fields, setup_method_args, **kwargs)

    # ------------------------------------------------------------------ training
    @inference_only
    def train(
        self,
        max_epochs: int | None = None,
        *,
        stage: Literal["both", "vae", "prior"] = "both",
        max_epochs_prior: int | None = None,
        prior_steps: int = PRIOR_STEPS,
        early_stopping_prior: bool = False,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        batch_size: int = 128,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        lr: float = 1e-3,
        lr_prior: float = 5e-4,
        plan_kwargs: dict | None = None,
        pin_memory: bool | None = None,
        compile: bool = False,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        **trainer_kwargs,
    ) -> None:
        """Train stage 1 (the token VAE), stage 2 (the DiT prior) or both, in that order.

        Each stage runs scvi-tools' data splitter, training plan and Lightning trainer, with
        validation and a progress bar; the VAE stops early on its validation loss, the prior
        trains for its budget (see ``prior_steps``). Any Lightning accelerator, ``devices``
        and ``strategy`` (e.g. ``"ddp"``) pass through.

        Parameters
        ----------
        max_epochs
            Epochs of the VAE stage; ``None`` uses scvi-tools' heuristic for the data size.
        stage
            ``"both"``, ``"vae"`` or ``"prior"`` (the prior needs a trained VAE).
        max_epochs_prior
            Epochs of the prior stage; ``None``: ``max_epochs`` when that is given, else
            ``prior_steps`` optimiser steps whatever the data size.
        prior_steps
            The prior's budget in optimiser steps when neither ``max_epochs`` nor
            ``max_epochs_prior`` is given (the trainer's ``max_steps``, so that it holds
            on any number of devices). The DiT keeps learning its conditions long after
            its denoising loss looks flat (``benchmarks/prior_design.py`` measures the
            generated cells along the way): give it this many steps for generation.
        early_stopping_prior
            Early stopping of the prior on its validation loss (off by default: that loss
            is dominated by the noise of the diffusion steps drawn, and stopped the prior
            before it had learned its conditions). ``early_stopping`` is the VAE's.
        lr, lr_prior
            Learning rates of the two stages.
        plan_kwargs
            Extra :class:`~scvi.train.TrainingPlan` arguments for both stages.
        train_size, validation_size
            Split of the cells (scvi-tools' ``DataSplitter``). ``train_size=1.0`` trains on
            every cell, without validation or early stopping.
        pin_memory
            Page-locked host batches for faster copies to a GPU; ``None`` turns it on when
            training on CUDA.
        compile
            Compile the encoder, decoder and DiT in place with :func:`torch.compile`; they
            stay compiled for later training and inference, and checkpoints are unchanged
            (worth it for long runs on a GPU; the first steps pay the compilation).
        checkpoint_dir
            Write a Lightning checkpoint of each stage after every epoch, to
            ``checkpoint_dir/<stage>/last.ckpt`` (weights, optimiser, epoch, early-stopping
            and random-number states), and ``done.json`` beside it when the stage ends.
        resume
            Continue from ``checkpoint_dir``: finished stages are restored, an interrupted
            one goes on from its last epoch. Give the same arguments as the interrupted
            call; on a CPU the result matches an uninterrupted run. Lightning checkpoints
            are read with ``torch.load(weights_only=True)``, which runs no code.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (a Lightning ``Trainer``), e.g.
            ``precision="bf16-mixed"``, ``strategy="ddp"``, ``enable_progress_bar=False``
            or ``datasplitter_kwargs`` / ``load_sparse_tensor`` for the loaders. Gradients
            are clipped to norm ``gradient_clip_val``: by default 1000 in the VAE stage and
            10 in the prior stage, above every normal step measured
            (``benchmarks/grad_norms.py``); ``None`` turns clipping off.

        Raises
        ------
        TrainingDivergedError
            When a loss or gradient becomes NaN or infinite; it names the epoch and step.
        """
        from scvi.model._utils import get_max_epochs_heuristic

        stages = list(STAGES) if stage == "both" else [stage]
        if stages == ["prior"] and "vae" not in self.trained_stages_:
            raise RuntimeError("Train the VAE first: model.train(stage='vae') or stage='both'.")
        if self.adata is None:
            raise ValueError(
                "This model was loaded without data; load it onto an AnnData "
                "(SCFM.load(path, adata=...)) to train it further."
            )
        if not self.is_multimodal:  # the counts may have changed since setup_anndata
            check_layer_counts(self.adata, self.registry_["setup_args"].get("layer"))
        epochs_given = max_epochs is not None
        max_epochs = max_epochs or get_max_epochs_heuristic(self.adata.n_obs)
        from scvi.dataloaders._data_splitting import validate_data_split

        _, n_val = validate_data_split(self.adata.n_obs, train_size, validation_size)
        prior_max_steps = None
        if max_epochs_prior is None and epochs_given:
            max_epochs_prior = max_epochs
        elif max_epochs_prior is None:  # a budget of optimiser steps, not of epochs
            if not isinstance(prior_steps, int | np.integer) or prior_steps < 1:
                raise ValueError(
                    f"prior_steps={prior_steps!r}; give a positive number of optimiser "
                    "steps, or max_epochs_prior for a budget in epochs."
                )
            # Lightning stops at max_steps; the epochs only bound it. Each of n devices
            # sees 1/n of the cells per epoch, so the bound allows for the devices given.
            max_epochs_prior = prior_epochs(
                self.adata.n_obs, prior_steps, batch_size, devices, train_size, validation_size
            )
            prior_max_steps = int(prior_steps)
        if n_val > 0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        elif early_stopping or early_stopping_prior:
            logger.info("No validation cells in this split: early stopping is off.")
            early_stopping = early_stopping_prior = False
        stops = {"vae": early_stopping, "prior": early_stopping_prior}
        if pin_memory is None:
            pin_memory = _uses_cuda(accelerator)
        if pin_memory:
            ds_kwargs = dict(trainer_kwargs.pop("datasplitter_kwargs", None) or {})
            trainer_kwargs["datasplitter_kwargs"] = {"pin_memory": True, **ds_kwargs}
        if "strategy" not in trainer_kwargs:
            strategy = _data_parallel_strategy(accelerator, devices)
            if strategy is not None:
                trainer_kwargs["strategy"] = strategy
        ckpt_root, _ = self._checkpointed(
            checkpoint_dir, resume, train_size, validation_size, trainer_kwargs
        )
        if compile:
            # In place (nn.Module.compile): parameter names, and so checkpoints, are unchanged.
            for part in self.module.compile_targets():
                part.compile()
        seconds: dict[str, float] = {}
        for st in stages:
            if resume:
                history = self._restore_finished_run(ckpt_root / st)
                if history is not None:
                    self.histories_[st] = history
                    if st not in self.trained_stages_:
                        self.trained_stages_.append(st)
                    continue
            epochs = max_epochs if st == "vae" else max_epochs_prior
            kwargs = {"lr": lr if st == "vae" else lr_prior, **(plan_kwargs or {})}
            if st == "vae":
                kwargs.setdefault("n_epochs_kl_warmup", max(1, epochs // 3))
            else:
                kwargs.setdefault("optimizer", "AdamW")
                kwargs.setdefault("weight_decay", 0.0)
                # scvi-tools' default Adam eps (0.01) suits the VAE but all but stalls the
                # DiT, whose gradients are small.
                kwargs.setdefault("eps", 1e-8)
            # a query model (genes masked for all its cells) keeps the reference's shares
            fresh = self.module.active_adapter is None and bool(self.module.gene_mask.all())
            if st == "vae" and fresh:
                self._fit_gene_frac()
                self._fit_modality_init()
            if st == "prior" and (fresh or "prior" not in self.trained_stages_):
                # The DiT of a pretrained model keeps the scale it was trained with.
                self._fit_latent_scale(batch_size)  # before set_stage: it switches to eval
            self.module.set_stage(st)
            if not any(p.requires_grad for p in self.module.parameters()):
                raise ValueError(
                    f"Nothing trains in stage {st!r}: the active adapter "
                    f"{self.module.active_adapter!r} freezes every weight of it (a linear probe "
                    "trains only task heads, e.g. in CellAnnotator). Choose another strategy "
                    "or stage, or call set_adapter(None) to train the base model."
                )
            self.history_, self.is_trained_ = None, False
            start = time.perf_counter()
            try:
                steps = {"max_steps": prior_max_steps} if st == "prior" and prior_max_steps else {}
                self._run_training(
                    what=f"SCFM.train, stage {st!r}",
                    clip=DEFAULT_GRADIENT_CLIP if st == "vae" else PRIOR_GRADIENT_CLIP,
                    folder=None if ckpt_root is None else ckpt_root / st,
                    resume=resume,
                    trainer_kwargs={**trainer_kwargs, **steps},
                    max_epochs=epochs,
                    accelerator=accelerator,
                    devices=devices,
                    train_size=train_size,
                    validation_size=validation_size,
                    batch_size=batch_size,
                    early_stopping=stops[st],
                    early_stopping_patience=early_stopping_patience,
                    early_stopping_monitor="elbo_validation",
                    plan_kwargs=kwargs,
                )
            except BaseException:
                self.is_trained_ = bool(self.trained_stages_)
                raise
            finally:
                self.histories_[st] = self.history_ or {}
            if st not in self.trained_stages_:
                self.trained_stages_.append(st)
            seconds[st] = time.perf_counter() - start
        self.module.set_stage("vae")
        self.module.eval()
        self.is_trained_ = True
        self._record_training(seconds)

    @property
    def history(self) -> dict[str, dict[str, pd.DataFrame]]:
        """Training curves per stage: ``{"vae": {...}, "prior": {...}}``, each scvi-style."""
        return self.histories_

    @torch.no_grad()
    def _fit_gene_frac(self) -> None:
        """Record each gene's share of all counts (used to rescale cells missing genes)."""
        matrix = self._counts_matrix(self.adata)
        if self.batch_gene_masks_:
            lib, frac = self._gene_frac_by_panel(matrix)
        else:
            lib, col = matrix_sums(matrix)  # a block at a time when backed
            frac = col / max(col.sum(), 1.0)
        frac = torch.as_tensor(frac, dtype=torch.float32)
        self.module.ref_gene_frac.copy_(frac.to(self.module.ref_gene_frac.device))
        # Start the library model at the data's log-normal fit (its output bias).
        log_lib = np.log(np.maximum(lib[lib > 0], 1.0))  # cells lacking RNA (MuData) left out
        bias = self.module.decoder.lib_out.bias
        bias[0] = float(log_lib.mean())
        bias[1] = float(np.log(np.expm1(max(log_lib.std(), 1e-2))))

    def _gene_frac_by_panel(self, matrix) -> tuple[np.ndarray, np.ndarray]:
        """Library sizes, and each gene's share of all counts among the cells that measure
        it (data sets with different gene panels): a gene's counts over the full libraries
        of the batches that observe it, a batch's full library being its observed one over
        the share of counts its genes hold. One pass over the data, a block at a time."""
        codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY))
        codes = codes.ravel().astype(int)
        batches = self._batch_categories()
        observed = batch_mask_matrix(self.batch_gene_masks_, batches, matrix.shape[1])
        col = np.zeros((len(batches), matrix.shape[1]))
        lib_b = np.zeros(len(batches))
        lib = np.zeros(matrix.shape[0])
        for start, block in row_blocks(matrix):
            n = block.shape[0]
            r = np.asarray(block.sum(1), dtype=np.float64).ravel()
            lib[start : start + n] = r
            b = codes[start : start + n]
            for k in np.unique(b):
                rows = np.flatnonzero(b == k)
                col[k] += np.asarray(block[rows].sum(0), dtype=np.float64).ravel()
                lib_b[k] += r[rows].sum()
        # a batch's library covers only its genes: its full library is lib_b / (the share
        # of counts on its genes), which depends on the fractions; a few fixed-point steps
        num = (col * observed).sum(0)
        frac = np.full(matrix.shape[1], 1.0 / matrix.shape[1])
        for _ in range(20):
            covered = np.maximum((observed * frac).sum(1), 1e-12)  # (n_batch,)
            den = ((lib_b / covered)[:, None] * observed).sum(0)
            new = np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)
            new /= max(new.sum(), 1e-12)
            converged = np.abs(new - frac).max() < 1e-9
            frac = new
            if converged:
                break
        return lib, frac

    @torch.inference_mode()
    def _fit_latent_scale(self, batch_size: int) -> None:
        """Set the factor that brings stage-1 token samples to unit variance for diffusion."""
        self.module.eval()
        sq, n, peak = 0.0, 0, 0.0
        idx = np.random.default_rng(0).permutation(self.adata.n_obs)[:4096]
        for tensors in self._batches(self.adata, idx, batch_size):
            inference = self.module.inference(**self.module._get_inference_input(tensors))
            z = self.module.prior_tokens(inference)
            sq += z.float().pow(2).sum().item()
            n += z.numel()
            peak = max(peak, z.float().abs().max().item())
        scale = 1.0 / max(np.sqrt(sq / n), 1e-6)
        self.module.latent_scale.fill_(scale)
        # Samplers clip predicted tokens a little beyond the largest seen.
        self.module.latent_clip.fill_(1.5 * peak * scale)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        return_tokens: bool = False,
        batch_size: int | None = None,
        pooling: Literal["concat", "mean"] = "concat",
    ) -> np.ndarray:
        """Cell embeddings from the stage-1 encoder.

        Parameters
        ----------
        adata
            AnnData with the model's genes (defaults to the training data).
        indices
            Cells to embed (default: all).
        give_mean
            Posterior mean (default) or a sample.
        return_tokens
            Return the tokens ``(n_cells, n_tokens, token_dim)`` instead of one vector.
        pooling
            How the tokens make one vector per cell: ``"concat"`` (default) joins them,
            ``(n_cells, n_tokens * token_dim)``; ``"mean"`` averages them,
            ``(n_cells, token_dim)``. Each token carries other information, so averaging
            loses most of it (``benchmarks/latent_design.py`` measures both).

        Returns
        -------
        The embedding, ``(n_cells, n_tokens * token_dim)`` by default, or the tokens.
        """
        if pooling not in ("concat", "mean"):
            raise ValueError(f"pooling={pooling!r}; choose 'concat' or 'mean'.")
        self._check_if_trained(warn=True)
        self.module.eval()
        out = []
        for tensors in self._batches(adata, indices, batch_size or INFERENCE_BATCH_SIZE):
            inputs = self.module._get_inference_input(tensors)
            if give_mean:
                z = self.module.posterior_mean(**inputs)  # (B, T, d)
            else:
                z = self.module.inference(**inputs)[MODULE_KEYS.QZ].sample()
            if not return_tokens:
                z = z.flatten(1) if pooling == "concat" else z.mean(1)
            out.append(z.float().cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def get_latent_statistics(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """How the model uses its latent on these cells: per token, the posterior noise
        against the spread of the posterior means across cells, the active dimensions, the
        KL to the prior and, with ``labels_key`` / ``batch_key`` (``obs`` columns), how much
        of the token's spread separates cell types / batches
        (:func:`~scfm_adapt.metrics.latent_usage`)."""
        from ..metrics import latent_usage

        self._check_if_trained(warn=True)
        self.module.eval()
        means, variances = [], []
        for tensors in self._batches(adata, indices, batch_size):
            qz = self.module.inference(**self.module._get_inference_input(tensors))[MODULE_KEYS.QZ]
            means.append(qz.loc.float().cpu().numpy())
            variances.append(qz.scale.float().pow(2).cpu().numpy())
        data = self.adata if adata is None else adata
        obs = data.obs if indices is None else data.obs.iloc[np.asarray(indices)]
        groups = {}
        for name, key in (("labels", labels_key), ("batches", batch_key)):
            if key is not None:
                if key not in obs:
                    raise KeyError(f"{key!r} is not a column of adata.obs.")
                groups[name] = obs[key].to_numpy()
        return latent_usage(np.concatenate(means), np.concatenate(variances), **groups)

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1.0,
        n_samples: int = 1,
        return_numpy: bool = False,
        batch_size: int | None = None,
        transfer: Literal["decoder", "inversion"] = "decoder",
        n_steps: int = 50,
        strength: float = 0.9,
        modality: str = "rna",
        given: Sequence[str] | None = None,
        protein_background: bool = False,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised expression: the decoder's mean at a fixed library size.

        Parameters
        ----------
        adata
            AnnData or, for a model set up with :meth:`setup_mudata`, a MuData (an AnnData
            given to such a model is its RNA alone: the other modalities are predicted).
        modality
            ``"rna"``, or for a MuData model ``"protein"`` or ``"atac"``. Protein is in
            ADT counts (``library_size`` does not apply); ATAC is the expected counts per
            peak at ``library_size`` fragments.
        given
            Modalities the encoder sees (default: all a cell has), e.g. ``("rna",)`` to
            predict protein from RNA alone on cells that have both.
        protein_background
            Include the background component in protein expression (default: foreground
            only, like totalVI's ``include_protein_background=False``).
        transform_batch
            Express every cell as if it came from this batch (counterfactual batch).
        transfer
            How ``transform_batch`` acts: ``"decoder"`` decodes the cell's own tokens with
            the other batch's decoder embedding (scVI's way); ``"inversion"`` also moves
            the tokens, by DDIM inversion under the cell's batch and regeneration under
            the target batch with the DiT prior (see :meth:`counterfactual`; needs a
            prior conditioned on the batch, and ``n_samples=1``).
        n_steps, strength
            DDIM steps and strength of the ``"inversion"`` transfer.
        gene_list
            Return only these genes.
        library_size
            Scale of each cell's expression: a number (1 gives fractions) or ``"latent"``
            for the observed library size.
        n_samples
            Posterior samples averaged (1 uses the posterior mean).

        Returns
        -------
        Cells × genes DataFrame (or array with ``return_numpy=True``).
        """
        adata = self.adata if adata is None else adata  # validated once, by _batches
        if modality != "rna" or given is not None:
            if not self.is_multimodal:
                raise ValueError(
                    f"modality={modality!r} / given={given!r} need a model set up with "
                    "SCFM.setup_mudata; this one reads RNA only."
                )
            if transfer != "decoder":
                raise ValueError("transfer='inversion' is for RNA without `given`.")
            names = np.asarray(self._feature_names(modality))
            cols = _columns(names, gene_list, f"Features not in the model's {modality}")
            values = self._modality_expression(
                adata,
                indices,
                modality,
                given,
                transform_batch,
                library_size,
                n_samples,
                batch_size,
                protein_background,
            )[:, cols]
            return _expression_frame(values, adata, indices, names[cols], return_numpy)
        code = self._batch_code(transform_batch)
        if transfer not in ("decoder", "inversion"):
            raise ValueError(f"transfer={transfer!r}; use 'decoder' or 'inversion'.")
        inversion = transfer == "inversion" and code is not None
        if inversion:
            self._check_prior()
            if "batch" not in self.module.dit.cat_embed:
                raise ValueError(
                    "transfer='inversion' needs a prior conditioned on the batch; this model "
                    "has one batch or none registered. Use transfer='decoder'."
                )
            if n_samples != 1:
                raise ValueError("transfer='inversion' uses the posterior mean: n_samples=1.")
        genes = np.asarray(self.var_names_)
        cols = _columns(genes, gene_list, "Genes not in the model")
        self.module.eval()
        out = []
        for tensors in self._batches(adata, indices, batch_size):
            if inversion:
                z, library, _ = self._counterfactual_batch(
                    tensors, {"batch": code}, n_steps, strength, 1.0
                )
                inf = {MODULE_KEYS.LIBRARY: library}
            else:
                inf = self.module.inference(
                    **self.module._get_inference_input(tensors), n_samples=n_samples
                )
                z = inf[MODULE_KEYS.QZ].loc if n_samples == 1 else inf[MODULE_KEYS.Z]
            lib = (
                inf[MODULE_KEYS.LIBRARY]
                if library_size == "latent"
                else torch.full_like(inf[MODULE_KEYS.LIBRARY], float(library_size))
            )
            tb = (
                None
                if code is None
                else torch.full_like(tensors[REGISTRY_KEYS.BATCH_KEY].view(-1), code)
            )
            px = self.module.decode(z, lib, self.module.conditions(tensors), transform_batch=tb)
            mean = px.mean if n_samples == 1 else px.mean.mean(0)
            out.append(mean[:, cols].float().cpu().numpy())
        return _expression_frame(np.concatenate(out), adata, indices, genes[cols], return_numpy)

    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Counts drawn from the posterior predictive: ``(n_cells, n_genes[, n_samples])``."""
        self.module.eval()
        out = []
        for tensors in self._batches(adata, indices, batch_size):
            x = self.module.sample(tensors, n_samples=n_samples)  # (B, G) or (S, B, G)
            out.append((x.permute(1, 2, 0) if n_samples > 1 else x).cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> dict[str, float]:
        """Mean negative log-likelihood of the counts per cell (lower is better).

        Like scvi-tools' method of the same name: one posterior sample per cell, so the
        numbers of the two are comparable.
        """
        self.module.eval()
        stage, total, n = self.module.stage, 0.0, 0
        self.module.set_stage("vae")
        try:
            for tensors in self._batches(adata, indices, batch_size):
                _, _, loss = self.module(tensors)
                total += loss.reconstruction_loss_sum.item()
                n += tensors[REGISTRY_KEYS.X_KEY].shape[0]
        finally:
            self.module.set_stage(stage)
        return {"reconstruction_loss": total / n}

    # ------------------------------------------------------------------ save / load
    @inference_only
    def save(
        self, dir_path: str | Path, overwrite: bool = False, save_anndata: bool = False
    ) -> Path:
        """Save to folder ``dir_path`` (safetensors weights + JSON config), atomically.

        The config holds the genes, the setup registry (category mappings), the model's
        init arguments and training history; ``save_anndata`` also writes ``adata.h5ad``.
        """
        return super().save(dir_path, overwrite=overwrite, save_anndata=save_anndata)

    def _checkpoint_config(self) -> dict:
        return {
            "init_kwargs": self.init_kwargs_,
            "var_names": self.var_names_,
            "modality_var_names": self.modality_var_names_,
            "registry": self.registry_,
            "trained_stages": self.trained_stages_,
            "history": self.histories_,
            "extension": self.module.extension,
            "adaptation": self.module.adaptation_meta(),
            "batch_gene_masks": self.batch_gene_masks_,
        }

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        return self.module.checkpoint_state()

    @classmethod
    def _from_checkpoint(cls, where, state: dict, config: dict, adata) -> SCFM:
        """Build the model a checkpoint's config describes and load its weights."""
        registry = config["registry"]
        # Saves from before ``encoder_rank`` have one full gene map.
        init_kwargs = {"encoder_rank": None, **config["init_kwargs"]}
        method = registry.get("setup_method_name", "setup_anndata")
        if adata is not None:
            if method == "setup_mudata":
                if not is_mudata(adata):
                    raise ModalityError(
                        f"{where} holds a MuData model; load it onto a MuData with the "
                        f"modalities {registry['setup_args']['modalities']}, or without data."
                    )
                rna = adata.mod.get(registry["setup_args"]["modalities"]["rna"])
                check_genes(rna.var_names if rna is not None else [], config["var_names"])
            else:
                check_genes(adata.var_names, config["var_names"])
            transfer_errors(
                getattr(cls, method), adata, source_registry=registry, **registry["setup_args"]
            )
            model = cls(adata, **init_kwargs)
        else:
            model = cls(
                None,
                registry=registry,
                var_names=config["var_names"],
                modality_var_names=config.get("modality_var_names"),
                **init_kwargs,
            )
        model.batch_gene_masks_ = config.get("batch_gene_masks")
        extension = config.get("extension")
        if extension and any([extension["batch"], extension["labels"], *extension["cat_covs"]]):
            model.module = model._make_module(extension)
        else:
            model._set_batch_gene_masks(model.module)
        meta = config.get("adaptation", {})
        model.module.build_adapters(meta)
        adapt_tensors = model.module.pop_adaptation_tensors(state)
        if "px_r_extra" in state and model.module.px_r_extra is None:
            raise CheckpointError(f"{where}: px_r_extra without a batch extension.")
        model.module.load_state_dict(state, strict=True)
        model.module.restore_adaptation(meta, adapt_tensors)
        model.trained_stages_ = list(config.get("trained_stages", []))
        model.histories_ = config.get("history", {})
        model.is_trained_ = bool(model.trained_stages_)
        return model

    # ------------------------------------------------------------------ printing
    def _summary(self) -> str:
        m = self.module
        n_params = sum(p.numel() for p in m.parameters())
        conds = ", ".join(m.dit.condition_names) or "none"
        stages = ", ".join(self.trained_stages_) or "none"
        adapters = ", ".join(
            f"{n} ({s.strategy}{', active' if n == m.active_adapter else ''})"
            for n, s in m.adapter_specs.items()
        )
        extra = f"\n  adapters: {adapters}" if adapters else ""
        if not bool(m.gene_mask.all()):
            extra += f"\n  query genes observed: {int(m.gene_mask.sum())} of {m.n_input}"
        if m.batch_gene_mask is not None:
            per = m.batch_gene_mask.sum(1).tolist()
            extra += f"\n  genes observed per batch (gene panels): {per} of {m.n_input}"
        return (
            f"SCFM: {m.n_input} genes → {m.n_tokens} latent tokens × {m.token_dim}, "
            f"{m.gene_likelihood.upper()} likelihood, dispersion per {m.dispersion}\n"
            f"  encoder: {len(m.encoder.blocks)}-block transformer, width {m.encoder.hidden}, "
            f"{m.tokenizer} tokens\n"
            f"  prior: DiT, {len(m.dit.blocks)} adaLN-Zero blocks, conditions: {conds}\n"
            f"  parameters: {n_params:,}; trained stages: {stages}{extra}"
        )

"""Adaptation methods of :class:`~scfm_adapt.model.SCFM`: ``adapt``, named adapters,
merging, adapter checkpoints and query mapping onto a reference (scArches-style)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import __version__
from ..errors import AdapterMismatchError, CheckpointError
from ..module import AdapterSpec
from ._io import read_checkpoint, write_checkpoint

logger = logging.getLogger(__name__)

ADAPTER_KIND = "scfm_adapter"
_SHAPE_KEYS = (
    "n_tokens",
    "token_dim",
    "encoder_hidden",
    "encoder_depth",
    "decoder_hidden",
    "dit_hidden",
    "dit_depth",
    "gene_likelihood",
    "dispersion",
)


def genes_digest(var_names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(map(str, var_names)).encode()).hexdigest()


class AdaptationMixin:
    """Mixed into :class:`~scfm_adapt.model.SCFM`; see :meth:`adapt`."""

    def adapt(
        self,
        strategy: str = "lora",
        *,
        name: str = "default",
        parts: Sequence[str] = ("encoder", "dit"),
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
        bottleneck: int = 16,
        n_blocks: int = 1,
        verbose: bool = True,
    ) -> dict[str, int | float]:
        """Add a named adapter, make it active, and freeze everything else.

        After ``adapt``, :meth:`train` (and task models built on this one) update only the
        adapter's weights. Every new path starts as an exact no-op: before training, the
        adapted model's outputs are bit-identical to the pretrained model's.

        Parameters
        ----------
        strategy
            ``"lora"`` (through :mod:`peft`), ``"adapter"`` (bottleneck adapters),
            ``"partial"`` (last ``n_blocks`` blocks, norms and output layers),
            ``"full"`` or ``"linear_probe"`` (nothing in the backbone trains).
        name
            Adapter name; several adapters coexist and :meth:`set_adapter` switches.
        parts
            Which parts to adapt: any of ``"encoder"``, ``"dit"`` (the prior, and its EMA
            copy) and ``"decoder"`` (``lora``, ``partial`` and ``full`` only).
        rank, alpha, dropout, target_modules
            LoRA rank, scaling ``alpha / rank``, dropout, and the linear layers to adapt
            (default: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every block;
            ``fc`` and ``scale_head`` of the decoder). Names are relative to a block or
            part, e.g. ``"gene_to_tokens"`` adds the encoder's gene projection.
        bottleneck
            Width of the bottleneck adapters.
        n_blocks
            Blocks unfrozen from the top by ``"partial"``.

        Returns
        -------
        ``{"trainable", "backbone", "added", "fraction"}``: parameters that train (in any
        stage), of the pretrained backbone (EMA copy excluded), added by all adapters, and
        the trainable share of the backbone.
        """
        self.module.add_adapter(
            name,
            strategy,
            tuple(parts),
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            target_modules=tuple(target_modules) if target_modules else None,
            bottleneck=bottleneck,
            n_blocks=n_blocks,
        )
        report = self.parameter_report()
        msg = (
            f"Adapter {name!r} ({strategy}) on {', '.join(parts)}: "
            f"{report['trainable']:,} trainable of {report['backbone']:,} backbone parameters "
            f"({report['fraction']:.2%})."
        )
        logger.info(msg)
        if verbose:
            print(msg)
        self._model_summary_string = self._summary()
        return report

    def parameter_report(self, stage: str | None = None) -> dict[str, int | float]:
        """Trainable, backbone and adapter parameter counts (see :meth:`adapt`)."""
        return self.module.parameter_report(stage)

    @property
    def adapters(self) -> dict[str, str]:
        """Adapter name → strategy."""
        return {n: s.strategy for n, s in self.module.adapter_specs.items()}

    @property
    def active_adapter(self) -> str | None:
        return self.module.active_adapter

    def set_adapter(self, name: str | None) -> None:
        """Switch to adapter ``name``; ``None`` gives the plain pretrained model back."""
        self.module.set_adapter(name)
        self.module.eval()
        self._model_summary_string = self._summary()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (restoring the pretrained weights if it was active)."""
        self.module.delete_adapter(name)
        self.module.eval()
        self._model_summary_string = self._summary()

    def merge_adapter(self) -> None:
        """Fold the active LoRA adapter into the base weights (undo with
        :meth:`unmerge_adapter`); outputs are unchanged up to rounding."""
        self.module.merge_adapter()

    def unmerge_adapter(self) -> None:
        """Subtract a merged LoRA adapter from the base weights again."""
        self.module.unmerge_adapter()

    def _fingerprint(self) -> dict:
        """What an adapter must agree on with its base: genes and sizes."""
        return {
            "n_genes": len(self.var_names_),
            "genes_sha256": genes_digest(self.var_names_),
            **{k: self.module.hparams_[k] for k in _SHAPE_KEYS},
            # Only for other tokenizers, so adapters saved before tokenizers existed still fit.
            **({"tokenizer": self.module.tokenizer} if self.module.tokenizer != "latent" else {}),
        }

    def save_adapter(
        self, dir_path: str | Path, name: str | None = None, overwrite: bool = False
    ) -> Path:
        """Save one adapter alone (safetensors + JSON), never the base weights.

        ``partial`` and ``full`` adapters store the base weights they train (their tuned
        values), which is the whole point of those strategies; ``linear_probe`` stores
        nothing but its description.
        """
        name = name or self.module.active_adapter
        if name is None or name not in self.module.adapter_specs:
            raise KeyError(f"No adapter {name!r} to save; adapters: {list(self.adapters)}.")
        spec = self.module.adapter_specs[name]
        tensors = self.module.adapter_tensors(name)
        config = {
            "model": ADAPTER_KIND,
            "scfm_adapt_version": __version__,
            "spec": spec.to_json(),
            "base": self._fingerprint(),
        }
        return write_checkpoint(dir_path, tensors, config, overwrite=overwrite)

    def load_adapter(
        self, dir_path: str | Path, name: str | None = None, activate: bool = True
    ) -> str:
        """Add an adapter saved by :meth:`save_adapter` (under its own or a new ``name``).

        Raises
        ------
        AdapterMismatchError
            The adapter was made for a model with other genes or other sizes.
        """
        tensors, config = read_checkpoint(dir_path)
        if config.get("model") != ADAPTER_KIND:
            raise CheckpointError(
                f"{dir_path} is not an adapter (it holds a {config.get('model')}); "
                "load models with SCFM.load."
            )
        mine, theirs = self._fingerprint(), config["base"]
        diff = {k: (theirs.get(k), mine[k]) for k in mine if theirs.get(k) != mine[k]}
        if diff:
            what = "; ".join(
                "the genes differ (same number, other names or order)"
                if k == "genes_sha256"
                else f"{k}: adapter {a!r} vs model {b!r}"
                for k, (a, b) in diff.items()
            )
            raise AdapterMismatchError(
                f"The adapter in {dir_path} was trained on another base model ({what}). "
                "Load it onto the model it was made for."
            )
        spec = AdapterSpec.from_json(config["spec"])
        name = name or spec.name
        previous = self.module.active_adapter
        self.module.add_adapter(name, spec.strategy, spec.parts, **spec.add_kwargs())
        try:
            self.module.load_adapter_tensors(
                name, {k: v.to(self.device) for k, v in tensors.items()}
            )
        except Exception:
            self.module.delete_adapter(name)
            self.module.set_adapter(previous)
            raise
        if not activate:
            self.module.set_adapter(previous)
        self.module.eval()
        self._model_summary_string = self._summary()
        return name

    @classmethod
    def trained_model(cls, model, what: str = "model"):
        """``model`` itself, or the model saved in folder ``model``; it must be trained."""
        if isinstance(model, str | Path):
            model = cls.load(model)
        if not isinstance(model, cls):
            raise TypeError(
                f"{what} must be a {cls.__name__} or a folder holding one, not "
                f"{type(model).__name__}."
            )
        if not model.is_trained_:
            raise ValueError(f"The {what} {cls.__name__} is not trained; train it first.")
        return model

    # ------------------------------------------------------------------ query mapping
    @classmethod
    def load_query_data(
        cls,
        adata,
        reference,
        *,
        strategy: str = "adapter",
        adapter_name: str = "query",
        parts: Sequence[str] = ("encoder", "dit"),
        min_gene_overlap: float = 0.5,
        verbose: bool = True,
        **adapt_kwargs,
    ):
        """Map a query data set onto a pretrained reference model (scArches-style).

        Genes are aligned by name (:func:`~scfm_adapt.data.align_genes`): query genes the
        reference lacks are dropped, reference genes the query lacks are *masked* (not
        imputed as zeros), and the overlap is reported. New batch and covariate categories
        get new embedding rows. The reference's weights are frozen: only the new adapter
        and the new rows train when you call :meth:`train` on the returned model.

        Parameters
        ----------
        adata
            Query AnnData with raw counts and the reference's ``obs`` columns (batch, labels,
            covariates) under the same names.
        reference
            A trained :class:`SCFM`, or the folder it was saved to.
        strategy, adapter_name, parts, **adapt_kwargs
            The adapter trained on the query (see :meth:`adapt`); ``"linear_probe"``
            trains only the new category rows.
        min_gene_overlap
            Smallest share of the reference's genes the query must have.

        Returns
        -------
        A model on the gene-aligned copy of the query, ``model.adata``; pass that object
        (or another AnnData aligned the same way) to the model's methods.

        Raises
        ------
        TooFewGenesError
            When the query has fewer than ``min_gene_overlap`` of the reference genes.
        """
        import copy

        import numpy as np

        from ..data import OBSERVED_KEY, align_genes, gene_overlap

        reference = cls.trained_model(reference, "reference")
        setup_args = dict(reference.registry_["setup_args"])
        layer = setup_args.get("layer")
        overlap = gene_overlap(adata.var_names, reference.var_names_)
        if overlap.missing or overlap.extra or list(adata.var_names) != reference.var_names_:
            adata = align_genes(
                adata, reference.var_names_, layer=layer, min_overlap=min_gene_overlap
            )
        msg = f"Query mapping: {overlap}."
        logger.info(msg)
        if verbose:
            print(msg)
        cls.setup_anndata(
            adata, source_registry=reference.registry_, extend_categories=True, **setup_args
        )
        model = cls(adata, **reference.init_kwargs_)
        module = copy.deepcopy(reference.module).cpu()
        sizes = model._registry_sizes()
        module.extend_categories(
            sizes["batch"] - module.n_batch,
            sizes["labels"] - module.n_labels,
            [a - b for a, b in zip(sizes["cat_covs"], module.n_cats_per_cov)],
        )
        observed = adata.var[OBSERVED_KEY].to_numpy() if OBSERVED_KEY in adata.var else None
        module.set_gene_mask(None if observed is None else torch.as_tensor(np.asarray(observed)))
        model.module = module
        model.var_names_ = list(reference.var_names_)
        model.trained_stages_ = list(reference.trained_stages_)
        model.histories_ = {}
        model.is_trained_ = True
        model.gene_overlap_ = overlap
        model.adapt(strategy, name=adapter_name, parts=parts, verbose=verbose, **adapt_kwargs)
        model.to_device(reference.device)
        model.module.eval()
        return model

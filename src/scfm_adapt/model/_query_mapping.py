"""Query mapping onto a pretrained reference (scArches-style): ``SCFM.load_query_data``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..data import OBSERVED_KEY, GeneOverlap, align_genes, gene_overlap, merge_batch_gene_masks
from ._adapters import AdaptationMixin

logger = logging.getLogger(__name__)


class QueryMappingMixin(AdaptationMixin):
    """Mixed into :class:`~scfm_adapt.model.SCFM`; see :meth:`load_query_data`. Query
    mapping is adaptation onto a query: the query's adapter comes from
    :meth:`~AdaptationMixin.adapt`."""

    # What this mixin needs from the model it is mixed into, beyond BaseModel:
    trained_stages_: list[str]
    batch_gene_masks_: dict[str, list[int]] | None
    histories_: dict
    #: The gene overlap of the query with the reference (set by :meth:`load_query_data`).
    gene_overlap_: GeneOverlap

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
        # gene panels: the reference's batches', and the query's own (data sets combined
        # with different genes, uns["scfm_batch_gene_masks"])
        model.batch_gene_masks_ = merge_batch_gene_masks(
            reference.batch_gene_masks_, model.batch_gene_masks_
        )
        module = copy.deepcopy(reference.module).cpu()
        sizes = model._registry_sizes()
        module.extend_categories(
            sizes["batch"] - module.n_batch,
            sizes["labels"] - module.n_labels,
            [a - b for a, b in zip(sizes["cat_covs"], module.n_cats_per_cov)],
        )
        observed = adata.var[OBSERVED_KEY].to_numpy() if OBSERVED_KEY in adata.var else None
        module.set_gene_mask(None if observed is None else torch.as_tensor(np.asarray(observed)))
        model._set_batch_gene_masks(module)
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

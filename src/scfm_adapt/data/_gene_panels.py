"""Data sets with different gene panels in one model: which genes each batch measures.

Pretraining across files (:func:`scfm_adapt.pretrain`) aligns every file to one gene
vocabulary. A gene a file does not measure is *unobserved* for that file's cells, not a
zero count: the model masks it out of the encoder input, the library and the likelihood
of those cells (:meth:`~scfm_adapt.module.SCFMModule.set_batch_gene_mask`), as totalVI
does for proteins missing from a batch's panel.

The panels travel in ``adata.uns[BATCH_GENE_MASKS]``::

    {"batch_key": "dataset", "observed": {"<batch>": bool array over var_names, ...}}

(batches not listed observe every gene). A model keeps them as ``{batch: [indices of
the genes it lacks]}`` in its config.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import SCFMInputError

#: Where an AnnData carries the gene panel of each batch.
BATCH_GENE_MASKS = "scfm_batch_gene_masks"
#: ``var`` column marking the genes a data set measures (one panel for all its cells).
OBSERVED_KEY = "scfm_observed"


def read_batch_gene_masks(adata, batch_key: str | None) -> dict[str, list[int]] | None:
    """``{batch: [indices of unobserved genes]}`` from ``adata.uns[BATCH_GENE_MASKS]``, or
    ``None`` when it has none (or every batch observes every gene).

    Raises
    ------
    SCFMInputError
        When the panels are keyed by another ``obs`` column than the model's batch key, or
        a panel's length is not the number of genes.
    """
    spec = adata.uns.get(BATCH_GENE_MASKS) if hasattr(adata, "uns") else None
    if not spec:
        return None
    key = str(spec.get("batch_key"))
    if key != str(batch_key):
        raise SCFMInputError(
            f"adata.uns[{BATCH_GENE_MASKS!r}] gives the gene panels of obs[{key!r}], but the "
            f"model's batch key is {batch_key!r}. Set up with batch_key={key!r} (each data "
            "set its own batch), or delete the entry if every cell measures every gene."
        )
    out = {}
    for batch, observed in (spec.get("observed") or {}).items():
        observed = np.asarray(observed, dtype=bool).ravel()
        if observed.size != adata.n_vars:
            raise SCFMInputError(
                f"The gene panel of batch {batch!r} has {observed.size} entries for "
                f"{adata.n_vars} genes; rebuild the data with scfm_adapt.pretrain."
            )
        missing = np.flatnonzero(~observed)
        if missing.size:
            out[str(batch)] = missing.tolist()
    return out or None


def merge_batch_gene_masks(
    *masks: Mapping[str, list[int]] | None,
) -> dict[str, list[int]] | None:
    """The panels of several sources in one dict (a later source's batch wins), or
    ``None`` when none has any: a reference's panels beside a query's own."""
    out: dict[str, list[int]] = {}
    for m in masks:
        out.update(m or {})
    return out or None


def batch_mask_matrix(
    masks: Mapping[str, list[int]] | None, batches: list[str], n_genes: int
) -> np.ndarray | None:
    """``(len(batches), n_genes)`` boolean: the genes each batch (in registry order)
    observes; ``None`` without masks. Panels of batches not in ``batches`` (a subset of
    the data without their cells) are not used."""
    if not masks:
        return None
    out = np.ones((len(batches), n_genes), dtype=bool)
    for i, b in enumerate(batches):
        out[i, masks.get(str(b), [])] = False
    return out


def select_panel(adata, batch: str):
    """The cells of one ``batch`` of data combined from files with different genes, as a
    data set of its own (a copy in memory): ``var["scfm_observed"]`` is that batch's gene
    panel, which a model built on it masks, as for a query aligned with
    :func:`~scfm_adapt.data.align_genes`. For models that read one panel for all their
    cells (:class:`~scfm_adapt.model.CellAnnotator`)."""
    spec = adata.uns.get(BATCH_GENE_MASKS)
    if not spec:
        raise SCFMInputError(
            f"adata has no uns[{BATCH_GENE_MASKS!r}]: every cell measures every gene, so "
            "there is no panel to select; subset the cells directly."
        )
    key = spec["batch_key"]
    cells = (adata.obs[key].astype(str) == str(batch)).to_numpy()
    if not cells.any():
        raise SCFMInputError(
            f"No cells of batch {batch!r} in obs[{key!r}]; batches: "
            f"{sorted(adata.obs[key].astype(str).unique())}."
        )
    sub = adata[cells]
    out = sub.to_memory() if getattr(sub, "isbacked", False) else sub.copy()
    observed = spec.get("observed", {}).get(str(batch))
    out.var[OBSERVED_KEY] = (
        np.ones(out.n_vars, dtype=bool) if observed is None else np.asarray(observed, bool)
    )
    del out.uns[BATCH_GENE_MASKS]
    return out

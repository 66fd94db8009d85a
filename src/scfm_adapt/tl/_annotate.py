"""``sfa.tl.annotate``: a trained annotator's labels, confidences, OOD flags and class
probabilities into ``obs`` / ``obsm``."""

from __future__ import annotations

import logging

from anndata import AnnData

from .._slots import SLOTS

logger = logging.getLogger(__name__)


def annotate(
    adata: AnnData,
    annotator,
    *,
    key_added: str = SLOTS.label,
    min_confidence: float | None = None,
    batch_size: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Annotate cells with a trained :class:`~scfm_adapt.model.CellAnnotator`.

    Parameters
    ----------
    adata
        AnnData with the annotator's genes and raw counts (labels are not needed).
    annotator
        A trained :class:`~scfm_adapt.model.CellAnnotator`.
    key_added
        Prefix of the written keys.
    min_confidence
        Also flag cells whose calibrated confidence is below this.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` (or the copy), having written:

    ``obs[key_added]``
        Predicted cell type (categorical); cells flagged as none of the known types get
        the annotator's unlabeled category (``"Unknown"`` by default).
    ``obs[key_added + "_confidence"]``
        Calibrated probability of the most likely known type.
    ``obs[key_added + "_ood_score"]``, ``obs[key_added + "_is_ood"]``
        Out-of-distribution score and flag.
    ``obsm[key_added + "_probs"]``
        Calibrated probabilities of every known type (a DataFrame, one column per type).
    ``uns[key_added]``
        ``"params"`` of this call, the ``"classes"`` and the annotator's ``"calibration"``.
    """
    import pandas as pd

    adata = adata.copy() if copy else adata
    table, probs = annotator.predict_details(
        adata, min_confidence=min_confidence, batch_size=batch_size
    )
    categories = [*annotator.classes_, annotator.unlabeled_category_]
    adata.obs[key_added] = pd.Categorical(table["label"].to_numpy(), categories=categories)
    adata.obs[f"{key_added}_confidence"] = table["confidence"].to_numpy()
    adata.obs[f"{key_added}_ood_score"] = table["ood_score"].to_numpy()
    adata.obs[f"{key_added}_is_ood"] = table["is_ood"].to_numpy()
    adata.obsm[f"{key_added}_probs"] = probs.set_axis(adata.obs_names, axis=0)
    adata.uns[key_added] = {
        "params": {
            "model": type(annotator).__name__,
            "strategy": annotator.strategy_,
            "min_confidence": min_confidence,
        },
        "classes": list(annotator.classes_),
        "calibration": dict(annotator.calibration_),
    }
    logger.info(
        "added obs[%r] (%d cells flagged as unknown), obs[%r], obsm[%r]",
        key_added,
        int(table["is_ood"].sum()),
        f"{key_added}_confidence",
        f"{key_added}_probs",
    )
    return adata if copy else None


def transfer_labels(
    query: AnnData,
    annotator,
    *,
    key_added: str = SLOTS.label,
    min_confidence: float | None = None,
    min_gene_overlap: float = 0.5,
    batch_size: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Transfer a reference's labels to a query data set, whatever its genes.

    The query's genes are aligned to the annotator's (:func:`~scfm_adapt.data.align_genes`:
    extra genes dropped, missing genes *masked* in the annotator's encoder for this call,
    not read as zeros, and its calibration refitted on its own training cells seen
    through the same genes, :meth:`~scfm_adapt.model.CellAnnotator.observing`), then
    :func:`annotate` writes the labels: cells unlike every
    reference type (the annotator's OOD flag) get its unlabeled category (``"Unknown"``)
    instead of a forced label. Nothing is trained, so this is zero-shot; train a
    :class:`~scfm_adapt.model.CellAnnotator` on a few labelled query cells
    (``pretrained=`` the reference) where labels exist.

    Parameters
    ----------
    query
        AnnData of raw counts (in ``X``, or in the layer the annotator's backbone was set
        up with); any genes, at least ``min_gene_overlap`` of the annotator's.
    annotator
        A trained :class:`~scfm_adapt.model.CellAnnotator` of the reference.
    key_added, min_confidence, batch_size, copy
        As in :func:`annotate`.

    Returns
    -------
    ``None`` (or the copy), having written :func:`annotate`'s slots into ``query``, and
    ``uns[key_added]["gene_overlap"]``: how many of the annotator's genes the query has.

    Raises
    ------
    TooFewGenesError
        When the query has fewer than ``min_gene_overlap`` of the annotator's genes.
    """
    import contextlib

    import numpy as np

    from ..data import OBSERVED_KEY, align_genes, gene_overlap

    out = query.copy() if copy else query
    genes = list(annotator.var_names_)
    overlap = gene_overlap(query.var_names, genes)
    aligned = out
    if list(query.var_names) != genes:
        layer = annotator.registry_["setup_args"].get("layer")
        aligned = align_genes(query, genes, layer=layer, min_overlap=min_gene_overlap)
    reading = contextlib.nullcontext()
    if OBSERVED_KEY in aligned.var:  # recalibrated on reference cells seen the same way
        observed = np.asarray(aligned.var[OBSERVED_KEY].to_numpy(), dtype=bool)
        reading = annotator.observing(observed, batch_size=batch_size or 256)
    with reading:
        annotate(
            aligned, annotator, key_added=key_added, min_confidence=min_confidence,
            batch_size=batch_size,
        )  # fmt: skip
    if aligned is not out:
        for k in (
            key_added,
            f"{key_added}_confidence",
            f"{key_added}_ood_score",
            f"{key_added}_is_ood",
        ):
            out.obs[k] = aligned.obs[k].array  # categorical labels stay categorical
        out.obsm[f"{key_added}_probs"] = aligned.obsm[f"{key_added}_probs"].set_axis(
            out.obs_names, axis=0
        )
        out.uns[key_added] = aligned.uns[key_added]
    out.uns[key_added]["gene_overlap"] = {
        "n_reference": overlap.n_reference,
        "n_shared": overlap.n_shared,
        "fraction": overlap.fraction,
    }
    out.uns[key_added]["params"]["transfer"] = True
    logger.info("Label transfer: %s.", overlap)
    return out if copy else None

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

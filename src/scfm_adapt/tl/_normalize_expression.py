"""``sfa.tl.normalize_expression``: the model's denoised expression into a layer (per
modality for a MuData)."""

from __future__ import annotations

import logging

from anndata import AnnData

from .._slots import SLOTS

logger = logging.getLogger(__name__)


def normalize_expression(
    adata: AnnData,
    model,
    *,
    key_added: str = SLOTS.normalized,
    transform_batch: str | None = None,
    library_size: float = 1e4,
    batch_size: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Write the model's denoised expression into ``adata.layers[key_added]``.

    Parameters
    ----------
    transform_batch
        Decode every cell as if from this batch.
    library_size
        Counts per cell of the written expression (10,000 by default, as ``normalize_total``).

    Returns
    -------
    ``None`` (or a copy), having written ``layers[key_added]`` (cells × genes, float32) and
    ``uns[key_added]["params"]``. For a MuData and a model set up with ``setup_mudata``,
    each modality's expression goes to ``mdata.mod[name].layers[key_added]`` (RNA and ATAC
    at ``library_size``, protein in ADT counts, foreground only) and the parameters to
    ``mdata.uns[key_added]``.
    """
    adata = adata.copy() if copy else adata
    if getattr(model, "is_multimodal", False) and hasattr(adata, "mod"):
        _normalize_modalities(adata, model, key_added, transform_batch, library_size, batch_size)
        return adata if copy else None
    adata.layers[key_added] = model.get_normalized_expression(
        adata,
        transform_batch=transform_batch,
        library_size=library_size,
        return_numpy=True,
        batch_size=batch_size,
    ).astype("float32")
    adata.uns[key_added] = {
        "params": {
            "model": type(model).__name__,
            "transform_batch": transform_batch,
            "library_size": library_size,
        }
    }
    logger.info("added layers[%r]", key_added)
    return adata if copy else None


def _normalize_modalities(mdata, model, key_added, transform_batch, library_size, batch_size):
    for role, name in model.modalities_.items():
        mdata.mod[name].layers[key_added] = model.get_normalized_expression(
            mdata,
            modality=role,
            transform_batch=transform_batch,
            library_size=library_size,
            return_numpy=True,
            batch_size=batch_size,
        ).astype("float32")
        logger.info("added mod[%r].layers[%r]", name, key_added)
    mdata.uns[key_added] = {
        "params": {
            "model": type(model).__name__,
            "modalities": dict(model.modalities_),
            "transform_batch": transform_batch,
            "library_size": library_size,
        }
    }

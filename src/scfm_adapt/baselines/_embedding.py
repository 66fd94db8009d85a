"""The classical embeddings a learned one must beat: log-normalised genes, and their PCA.

Counts are normalised to 10,000 per cell and ``log1p``-ed by Scanpy
(``normalize_total`` + ``log1p``, in the matrix's own dtype and sparsity, as a Scanpy user
would); highly variable genes are Scanpy's default ``seurat`` flavour on the log data.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _dense32(x: Any) -> np.ndarray:
    """A dense float32 array from a numpy or scipy sparse matrix."""
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def log_normalized(adata: Any, target_sum: float = 1e4) -> Any:
    """A copy of ``adata`` with ``X`` library-normalised to ``target_sum`` and ``log1p``-ed.

    The maths of :func:`scfm_adapt.metrics.lognorm`, computed by Scanpy on the AnnData (so
    ``X`` keeps its sparsity and dtype).
    """
    import scanpy as sc

    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def _hvg_mask(lognormed: Any, n_top_genes: int) -> np.ndarray:
    """Scanpy's ``seurat``-flavour highly variable genes of log-normalised cells."""
    import scanpy as sc

    return sc.pp.highly_variable_genes(lognormed, n_top_genes=n_top_genes, inplace=False)[
        "highly_variable"
    ].to_numpy()


def highly_variable_genes(adata: Any, n_top_genes: int = 2000) -> list[str]:
    """Names of the ``n_top_genes`` highly variable genes of ``adata``'s cells (raw counts),
    in ``var_names`` order; every gene when there are at most ``n_top_genes``.

    Scanpy's ``seurat`` flavour on :func:`log_normalized` counts. Pass the training cells
    only, so that held-out cells never inform the choice.
    """
    names = adata.var_names
    if adata.n_vars > n_top_genes:
        names = names[_hvg_mask(log_normalized(adata), n_top_genes)]
    return list(names)


def lognorm_genes(adata: Any, target_sum: float = 1e4) -> np.ndarray:
    """The log-normalised genes themselves as an embedding: ``(n_cells, n_genes)`` float32
    (:func:`log_normalized`, densified)."""
    return _dense32(log_normalized(adata, target_sum).X)


def pca_embedding(
    adata: Any,
    fit_mask: np.ndarray | None = None,
    n_comps: int = 50,
    n_top_genes: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """The usual Scanpy embedding: log-normalised (top-variable) genes, then PCA.

    Counts are normalised to 10,000 per cell and ``log1p``-ed; when there are more than
    ``n_top_genes`` genes, the ``n_top_genes`` highly variable ones (Scanpy's default
    ``seurat`` flavour) are kept. Gene selection and PCA (sklearn's, centred, not scaled)
    are fit on the ``fit_mask`` cells only and every cell is then projected, so held-out
    cells never inform the basis.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X``.
    fit_mask
        Boolean mask of the cells to fit on (default: all).
    n_comps
        Number of principal components (capped by the data's size).
    n_top_genes
        Highly variable genes to keep, when there are more genes than that.
    seed
        Random state of the PCA solver.

    Returns
    -------
    ``(n_cells, n_comps)`` float32 embedding.
    """
    from sklearn.decomposition import PCA

    fit_mask = np.ones(adata.n_obs, bool) if fit_mask is None else np.asarray(fit_mask, bool)
    lognorm = log_normalized(adata)
    if lognorm.n_vars > n_top_genes:
        lognorm = lognorm[:, _hvg_mask(lognorm[fit_mask], n_top_genes)]
    x = _dense32(lognorm.X)
    n_comps = min(n_comps, x.shape[1] - 1, int(fit_mask.sum()) - 1)
    pca = PCA(n_components=n_comps, random_state=seed).fit(x[fit_mask])
    return pca.transform(x).astype(np.float32)

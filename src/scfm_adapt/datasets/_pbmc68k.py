"""The built-in data set: scanpy's ``pbmc68k_reduced`` with its integer counts recovered."""

from __future__ import annotations

import warnings
from pathlib import Path

from ._counts import _check_counts, _counts_from_lognorm

#: ``.raw.X`` of scanpy's pbmc68k_reduced is ``log1p(counts / n_counts * 1e4)`` with
#: ``n_counts`` the library size over *all* genes of the original matrix.
TARGET_SUM = 1e4
#: The values of ``.raw.X`` are stored rounded to three decimals, so a recovered count is
#: exact when it reproduces the stored value to within half a quantum (5e-4), plus float32
#: round-off.
ATOL_LOG = 5.01e-4


def _scanpy_file() -> Path | None:
    """Path of the h5ad scanpy ships, found without importing scanpy (which is slow)."""
    import importlib.util

    spec = importlib.util.find_spec("scanpy")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"
    return p if p.is_file() else None


def _source():
    """scanpy's pbmc68k_reduced AnnData, as shipped (silencing notices about its old format)."""
    import anndata as ad

    f = _scanpy_file()
    with warnings.catch_warnings():
        # old-format / deprecation notices about the file's encoding are not actionable here
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        if f is not None:
            return ad.read_h5ad(f)
        import scanpy as sc  # pragma: no cover - scanpy moved its file

        return sc.datasets.pbmc68k_reduced()  # pragma: no cover


def pbmc68k():
    """PBMC 68k (reduced) with integer counts: the data set built into scanpy, offline.

    Reads the ``pbmc68k_reduced`` file that scanpy ships inside its package (Zheng et al. 2017,
    700 cells, the file behind :func:`scanpy.datasets.pbmc68k_reduced`) and recovers the
    integer UMI counts exactly from its log-normalised ``.raw``::

        counts = round(expm1(raw.X) * obs["n_counts"] / 1e4)

    Every entry is checked to be integral (the stored log values have three decimals, so each
    recovered count must reproduce its stored value to within 5e-4 in log space and the
    rounding must be unambiguous); a :class:`ValueError` is raised otherwise. No network access
    and no data folder are needed.

    Returns
    -------
    anndata.AnnData
        700 cells x 765 genes.

        - ``X``: integer counts, :class:`scipy.sparse.csr_matrix` of float32. They cover only
          the 765 genes kept in the file, so per-cell sums are 11-28 % of ``obs["n_counts"]``.
        - ``layers["lognorm"]``: the original ``.raw.X`` values
          (``log1p(normalize_total(target_sum=1e4))`` over all genes of the original data).
        - ``obs``: ``bulk_labels`` (10 FACS-sorted populations), ``louvain``, ``phase``
          (cell-cycle phase), ``S_score``, ``G2M_score``, ``n_counts`` (original library
          size), ``n_genes``, ``percent_mito``.
        - ``var``: gene symbols as index.
        - ``obsm``: ``X_pca``, ``X_umap`` from scanpy's file.

    Examples
    --------
    >>> import scfm_adapt as sfa
    >>> adata = sfa.datasets.pbmc68k()
    >>> adata.shape
    (700, 765)
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    src = _source()
    if src.raw is None or "n_counts" not in src.obs:
        raise ValueError("scanpy's pbmc68k_reduced lacks .raw or obs['n_counts'].")
    lognorm = sp.csr_matrix(src.raw.X, dtype="float32")
    counts = _counts_from_lognorm(
        lognorm,
        src.obs["n_counts"].to_numpy(),
        target_sum=TARGET_SUM,
        atol_log=ATOL_LOG,
        what="pbmc68k_reduced",
    )
    _check_counts(counts, "pbmc68k")
    adata = ad.AnnData(
        X=counts,
        obs=src.obs.copy(),
        var=pd.DataFrame(index=src.raw.var_names.copy()),
        layers={"lognorm": lognorm},
        obsm={k: src.obsm[k].copy() for k in ("X_pca", "X_umap") if k in src.obsm},
    )
    for k in ("bulk_labels_colors", "louvain_colors"):
        if k in src.uns:
            adata.uns[k] = src.uns[k]
    adata.uns["source"] = (
        "scanpy datasets/10x_pbmc68k_reduced.h5ad (Zheng et al. 2017; BSD-3); X = integer counts "
        "recovered exactly from .raw as round(expm1(raw.X) * n_counts / 1e4)"
    )
    return adata

"""Reading a data file and checking what the loaders promise about it."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

from ._counts import _check_counts


def _require_obs(adata, keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in adata.obs]
    if missing:
        raise ValueError(f"{what}: obs lacks the expected column(s) {missing}.")


def _read_counts_h5ad(f: Path, what: str, obs_keys: Iterable[str] = ()):
    """Read an h5ad whose ``X`` must hold integer counts; ``X`` is returned as CSR float32."""
    import anndata as ad
    import scipy.sparse as sp

    with warnings.catch_warnings():
        # old-format / deprecation notices about the file's encoding are not actionable here
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        adata = ad.read_h5ad(f)
    if not sp.issparse(adata.X) or adata.X.format != "csr" or adata.X.dtype != "float32":
        adata.X = sp.csr_matrix(adata.X, dtype="float32")
    _check_counts(adata.X, f"{what} ({f})")
    _require_obs(adata, obs_keys, f"{what} ({f})")
    return adata


def _write_h5ad(adata, dest: Path) -> None:
    """Write a converted download (compressed) to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(dest, compression="gzip")

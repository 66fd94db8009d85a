"""A small 10x multiome (RNA + ATAC) MuData, from muon's test data."""

from __future__ import annotations

import os
import warnings

from ._counts import _check_counts
from ._paths import _fetch

MULTIOME_FILE = "multiome_rna_atac_1000cells.h5mu"
#: scverse/muon test data (BSD-3), pinned to the commit the shared file came from.
MULTIOME_URL = (
    "https://github.com/scverse/muon/raw/03c762e5ebe44b5aa23392b1f31d27c41f2e0b44/"
    "tests/data/atac/test_rna_atac.h5mu"
)


def multiome(path: str | os.PathLike | None = None, download: bool = False):
    """10x multiome PBMC subset: paired gene expression and chromatin accessibility counts.

    Parameters
    ----------
    path
        The h5mu file (or a folder holding ``multiome_rna_atac_1000cells.h5mu``). Default: the
        data folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        If the file is not found, download it from ``MULTIOME_URL`` into
        ``~/.cache/scfm_adapt``.

    Returns
    -------
    mudata.MuData
        1,000 cells; modalities ``"rna"`` (45 genes) and ``"atac"`` (174 peaks), both with
        integer counts in ``X`` (CSR float32). ``var``: ``gene_ids``, ``feature_types``,
        ``genome``, ``interval``. No cell labels.

    Raises
    ------
    FileNotFoundError
        If the file is absent and ``download=False``.
    """
    import mudata as md
    import scipy.sparse as sp

    f = _fetch(MULTIOME_FILE, MULTIOME_URL, path, download)
    with warnings.catch_warnings():
        # old-format / deprecation notices about the file's encoding are not actionable here
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        mdata = md.read_h5mu(f)
    for name in ("rna", "atac"):
        if name not in mdata.mod:
            raise ValueError(f"{f}: modality {name!r} is missing (found {list(mdata.mod)}).")
        mod = mdata.mod[name]
        if not sp.issparse(mod.X) or mod.X.format != "csr" or mod.X.dtype != "float32":
            mod.X = sp.csr_matrix(mod.X, dtype="float32")
        _check_counts(mod.X, f"{f}: mod[{name!r}].X")
    return mdata

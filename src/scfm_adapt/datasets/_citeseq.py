"""10x PBMC CITE-seq (RNA + antibody counts), 200-cell subsets from scvi-tools' test data."""

from __future__ import annotations

import os

from ._counts import _check_counts
from ._io import _read_counts_h5ad
from ._paths import _fetch

CITESEQ_FILES = {
    "10k": "citeseq_pbmc10k_200cells.h5ad",
    "5k": "citeseq_pbmc5k_200cells.h5ad",
}
#: scverse/scvi-tools test data (BSD-3), pinned to the commit the shared files came from;
#: 10x Genomics pbmc_10k_protein_v3 / 5k_pbmc_protein_v3, 200 cells each, same layout
#: (X raw RNA counts, obsm["protein_expression"], uns["protein_names"]).
CITESEQ_URLS = {
    which: (
        "https://github.com/scverse/scvi-tools/raw/42906ae828ab983237ee0d03a3754bba87a3998b/"
        f"tests/test_data/pbmc_{which}_protein_v3.h5ad"
    )
    for which in CITESEQ_FILES
}


def citeseq_pbmc(
    which: str = "10k",
    path: str | os.PathLike | None = None,
    download: bool = False,
):
    """10x Genomics PBMC CITE-seq: RNA counts plus antibody-derived tag (ADT) counts.

    Parameters
    ----------
    which
        ``"10k"`` (pbmc_10k_protein_v3, 14 proteins) or ``"5k"`` (5k_pbmc_protein_v3,
        29 proteins).
    path
        The h5ad file (or a folder holding ``citeseq_pbmc{which}_200cells.h5ad``). Default: the
        data folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        If the file is not found, download it from ``CITESEQ_URLS[which]`` into
        ``~/.cache/scfm_adapt``.

    Returns
    -------
    anndata.AnnData
        200 cells x 16,727 genes (``"10k"``) or 200 x 16,581 (``"5k"``). ``X``: integer RNA
        counts (CSR float32; stored dense in the file). ``obsm["protein_expression"]``:
        integer ADT counts, cells x proteins (:class:`numpy.ndarray`), with the protein names
        in ``uns["protein_names"]``. ``obs``: QC only (``n_counts``, ``n_genes``,
        ``percent_mito``), no cell-type labels.

    Raises
    ------
    FileNotFoundError
        If the file is absent and ``download=False``.
    ValueError
        If ``which`` is not ``"10k"`` or ``"5k"``.
    """
    if which not in CITESEQ_FILES:
        raise ValueError(f"which={which!r}; choose '10k' or '5k'.")
    f = _fetch(CITESEQ_FILES[which], CITESEQ_URLS[which], path, download)
    adata = _read_counts_h5ad(f, f"citeseq_pbmc({which!r})")
    if "protein_expression" not in adata.obsm:
        raise ValueError(f"{f}: obsm['protein_expression'] (ADT counts) is missing.")
    _check_counts(adata.obsm["protein_expression"], f"{f}: obsm['protein_expression']")
    return adata


def citeseq_mudata(path: str | os.PathLike | None = None, download: bool = False):
    """Both 10x PBMC CITE-seq sets as one MuData with modalities ``"rna"`` and ``"protein"``.

    The two sets are batches with different antibody panels (14 and 29 proteins; the 14 are
    among the 29). RNA keeps the genes both sets share; protein is the union panel, in the 5k
    set's order, with the proteins a set did not measure left at 0 (scvi-tools and
    :meth:`~scfm_adapt.model.SCFM.setup_mudata` find those per-batch gaps and leave them out
    of the likelihood).

    Parameters
    ----------
    path, download
        As in :func:`citeseq_pbmc` (``path``: a folder holding both files).

    Returns
    -------
    mudata.MuData
        400 cells. ``mod["rna"]``: 15,792 genes (integer counts, CSR float32);
        ``mod["protein"]``: 29 proteins (integer counts, dense float32). ``obs["batch"]``:
        ``"pbmc10k"`` or ``"pbmc5k"``; cell names carry the batch as a suffix.
    """
    import anndata as ad
    import mudata as md
    import numpy as np
    import pandas as pd

    sets = {w: citeseq_pbmc(w, path, download) for w in ("10k", "5k")}
    panel = list(
        dict.fromkeys([*sets["5k"].uns["protein_names"], *sets["10k"].uns["protein_names"]])
    )
    genes = sets["10k"].var_names.intersection(sets["5k"].var_names, sort=False)
    rnas, prots = [], []
    for which, a in sets.items():
        a = a[:, genes].copy()
        a.obs_names = [f"{c}-pbmc{which}" for c in a.obs_names]
        y = np.zeros((a.n_obs, len(panel)), dtype=np.float32)
        cols = [panel.index(p) for p in a.uns["protein_names"]]
        y[:, cols] = np.asarray(a.obsm["protein_expression"], dtype=np.float32)
        prots.append(
            ad.AnnData(y, obs=pd.DataFrame(index=a.obs_names), var=pd.DataFrame(index=panel))
        )
        a.obs["batch"] = f"pbmc{which}"
        del a.obsm["protein_expression"]
        a.uns = {}
        rnas.append(a)
    rna = ad.concat(rnas, merge="same")
    protein = ad.concat(prots)
    mdata = md.MuData({"rna": rna, "protein": protein})
    mdata.obs["batch"] = pd.Categorical(rna.obs["batch"].to_numpy())
    return mdata

"""Norman et al. 2019 (CRISPRa, K562) + McFaline-Figueroa et al. 2023 (CRISPRi, glioma)."""

from __future__ import annotations

import os
from pathlib import Path

from ._counts import _counts_from_lognorm
from ._io import _read_counts_h5ad, _write_h5ad
from ._paths import _fetch, _raw_download

NORMAN_FILE = "norman2019_mcfaline2023_perturbench_devel.h5ad"

#: perturbench's development data set (altoslabs/perturbench, BSD-3):
#: src/perturbench/data/resources/devel.h5ad, log-normalised, pinned to a commit.
#: (github.com/<repo>/raw/... also resolves files stored with Git LFS.)
PERTURBENCH_DEVEL_URL = (
    "https://github.com/altoslabs/perturbench/raw/4dd6a03c54ef348f6be6e46e21ea7f80eb2daaa2/"
    "src/perturbench/data/resources/devel.h5ad"
)


def _build(dest: Path) -> None:
    """Recover integer counts from perturbench's log-normalised devel file and save it."""
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(_raw_download(PERTURBENCH_DEVEL_URL, "perturbench_devel.h5ad"))
    if "highly_variable" in a.var and not a.var["highly_variable"].all():
        a = a[:, a.var["highly_variable"].to_numpy()].copy()
    lognorm = sp.csr_matrix(a.X, dtype="float32")
    # library sizes of the normalisation are not stored: infer them per cell
    a.X = _counts_from_lognorm(lognorm, None, target_sum=1e4, what="perturbench devel.h5ad")
    a.layers["lognorm"] = lognorm
    a.uns["source"] = (
        f"{PERTURBENCH_DEVEL_URL}: X = integer counts recovered from log1p(normalize_total), "
        "layers['lognorm'] = original X"
    )
    _write_h5ad(a, dest)


def norman2019(
    dataset: str | None = None,
    path: str | os.PathLike | None = None,
    download: bool = False,
):
    """Norman 2019 CRISPRa singles and 2-gene combos, plus McFaline-Figueroa 2023 CRISPRi.

    perturbench's development data set, with integer counts recovered exactly from its
    log-normalised values (they cover only the 500 highly variable genes in the file).

    Parameters
    ----------
    dataset
        ``"norman19"`` (K562 CRISPRa, 3,375 cells) or ``"mcfaline23"`` (3 glioma lines,
        CRISPRi, 2,586 cells) to keep one study; ``None`` keeps both.
    path
        The h5ad file (or a folder holding it). Default: the data folder (``$SCFM_ADAPT_DATA``
        or ``../shared/data``), then the download cache.
    download
        If the file is not found, download perturbench's ``devel.h5ad``
        (``PERTURBENCH_DEVEL_URL``) and recover its counts into ``~/.cache/scfm_adapt``.

    Returns
    -------
    anndata.AnnData
        5,961 cells x 500 genes (3,375 with ``dataset="norman19"``). ``X``: integer counts
        (CSR float32); ``layers["lognorm"]``: the original log1p-normalised values.
        ``obs``: ``condition`` / ``perturbation`` (``"control"``, ``"SGK1"``,
        ``"KLF1+MAP2K6"``, ...; combos joined by ``+``), ``dataset``, ``cell_type`` (``k562``,
        ``T98G``, ``U87MG``, ``A172``), ``dose`` (``"1"`` single or ``"1+1"`` combo),
        ``perturbation_type`` (``CRISPRa``/``CRISPRi``), ``ncounts``, ``ngenes``.
        ``var``: gene symbols as index, HVG statistics.

    Raises
    ------
    FileNotFoundError
        If the file is absent and ``download=False``.
    ValueError
        If ``dataset`` is not one of the studies in the file.
    """
    f = _fetch(NORMAN_FILE, PERTURBENCH_DEVEL_URL, path, download, build=_build)
    adata = _read_counts_h5ad(
        f, "norman2019", ("condition", "perturbation", "dataset", "cell_type", "dose")
    )
    if dataset is not None:
        names = sorted(adata.obs["dataset"].astype(str).unique())
        if dataset not in names:
            raise ValueError(f"dataset={dataset!r} is not in the file; choose from {names}.")
        adata = adata[adata.obs["dataset"].astype(str) == dataset].copy()
        for k in adata.obs.columns:  # drop categories of the other study
            if hasattr(adata.obs[k], "cat"):
                adata.obs[k] = adata.obs[k].cat.remove_unused_categories()
    return adata

"""Kang et al. 2018 PBMC (GSE96583): IFN-beta stimulated vs control, and 8 control donors."""

from __future__ import annotations

import os
from pathlib import Path

from ._io import _read_counts_h5ad, _write_h5ad
from ._paths import _fetch, _raw_download

IFNB_FILE = "kang2018_ifnb_muscat.h5ad"
CTRL_FILE = "kang2018_ctrl_8donors.h5ad"

#: Where the shared files were made from: muscat's example data (R SingleCellExperiment
#: objects, GPL-3), https://github.com/HelenaLC/muscat/tree/master/data. Kept for reference:
#: .rda files cannot be read without R, so ``download=True`` uses ``KANG_URL`` instead.
MUSCAT_IFNB_URL = "https://github.com/HelenaLC/muscat/raw/master/data/example_sce.rda"
MUSCAT_CTRL_URL = (
    "https://github.com/HelenaLC/muscat/raw/d5acab66a2468bb51368f527b6cd617de8253a67/"
    "data/kang_se.rda"
)
#: The same cells (GSE96583 batch 2: 8 lupus donors, control and IFN-beta stimulated) as an
#: h5ad of raw counts: the file of ``pertpy.data.kang_2018()`` (figshare; also used by liana).
#: obs: ``label`` (ctrl/stim), ``cell_type``, ``replicate`` (donor).
KANG_URL = "https://figshare.com/ndownloader/files/34464122"
_KANG_RAW = "kang_counts_25k.h5ad"

#: The 5 cell types and 2 donors of muscat's ``example_sce``.
_IFNB_CLUSTERS = (
    "B cells",
    "CD14+ Monocytes",
    "CD4 T cells",
    "CD8 T cells",
    "FCGR3A+ Monocytes",
)
_IFNB_DONORS = ("101", "107")
_IFNB_MAX_PER_SAMPLE = 100


def _kang_source():
    """Download (once) and read the full Kang 2018 h5ad; return it with a ``donor`` column."""
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(_raw_download(KANG_URL, _KANG_RAW))
    missing = [k for k in ("label", "cell_type", "replicate") if k not in a.obs]
    if missing:
        raise ValueError(f"{KANG_URL}: obs lacks {missing}; the source file has changed.")
    a.X = sp.csr_matrix(a.X, dtype="float32")
    # "patient_1015" -> "1015"
    a.obs["donor"] = a.obs["replicate"].astype(str).str.extract(r"(\d+)\s*$")[0].to_numpy()
    return a


def _build_ctrl(dest: Path) -> None:
    import pandas as pd

    a = _kang_source()
    a = a[a.obs["label"].astype(str) == "ctrl"].copy()
    obs = pd.DataFrame(index=a.obs_names)
    obs["sample_id"] = pd.to_numeric(a.obs["donor"]).astype("int32")
    obs["cluster_id"] = a.obs["cell_type"].astype(str).astype("category")
    for k in ("tsne1", "tsne2"):
        if k in a.obs:
            obs[k] = a.obs[k].to_numpy()
    a.obs = obs
    a.uns = {"source": f"{KANG_URL} (Kang et al. 2018, GSE96583), control cells only"}
    _write_h5ad(a, dest)


def _build_ifnb(dest: Path) -> None:
    import numpy as np
    import pandas as pd

    a = _kang_source()
    keep = a.obs["donor"].isin(_IFNB_DONORS).to_numpy() & (
        a.obs["cell_type"].astype(str).isin(_IFNB_CLUSTERS).to_numpy()
    )
    a = a[keep].copy()
    group = a.obs["label"].astype(str)
    obs = pd.DataFrame(index=a.obs_names)
    obs["cluster_id"] = pd.Categorical(a.obs["cell_type"].astype(str))
    obs["sample_id"] = pd.Categorical(group + a.obs["donor"].astype(str))
    obs["group_id"] = pd.Categorical(group)
    # at most 100 cells per cluster-sample, as in muscat's example_sce (seeded draw)
    rng = np.random.default_rng(0)
    take = []
    for _, idx in obs.groupby(["cluster_id", "sample_id"], observed=True).indices.items():
        n = min(len(idx), _IFNB_MAX_PER_SAMPLE)
        take.append(np.sort(rng.choice(idx, size=n, replace=False)))
    take = np.sort(np.concatenate(take))
    a = a[take].copy()
    a.obs = obs.iloc[take].copy()
    a = a[:, np.asarray((a.X > 0).sum(0)).ravel() > 0].copy()
    a.uns = {
        "source": f"{KANG_URL} (Kang et al. 2018, GSE96583): donors 101, 107, 5 cell types, "
        "<=100 cells per cluster-sample, built like muscat's example_sce"
    }
    _write_h5ad(a, dest)


def kang2018_ifnb(path: str | os.PathLike | None = None, download: bool = False):
    """Kang et al. 2018 PBMC, IFN-beta stimulated vs control (muscat's example data).

    Parameters
    ----------
    path
        The h5ad file (or a folder holding ``kang2018_ifnb_muscat.h5ad``). Default: the data
        folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        If the file is not found, build it from the public Kang 2018 h5ad (``KANG_URL``) into
        ``~/.cache/scfm_adapt``: same donors, cell types and per-sample cap as muscat's
        ``example_sce``, but the cells are drawn anew and all detected genes are kept, so it
        is close to, not identical with, the curated file.

    Returns
    -------
    anndata.AnnData
        1,556 cells x 1,267 genes (the curated file). ``X``: integer counts (CSR float32).
        ``obs``: ``group_id`` (``ctrl``/``stim``), ``cluster_id`` (5 cell types),
        ``sample_id`` (4: ``ctrl101``, ``ctrl107``, ``stim101``, ``stim107``).
        ``var``: symbols as index, ``ENSEMBL``, ``SYMBOL``. ``layers["logcounts"]``: muscat's
        log-normalised values.

    Raises
    ------
    FileNotFoundError
        If the file is absent and ``download=False``.
    """
    f = _fetch(IFNB_FILE, KANG_URL, path, download, build=_build_ifnb)
    return _read_counts_h5ad(f, "kang2018_ifnb", ("group_id", "cluster_id", "sample_id"))


def kang2018_ctrl(path: str | os.PathLike | None = None, download: bool = False):
    """Kang et al. 2018 PBMC, control cells of 8 lupus donors (donors act as batches).

    Parameters
    ----------
    path
        The h5ad file (or a folder holding ``kang2018_ctrl_8donors.h5ad``). Default: the data
        folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        If the file is not found, build it from the public Kang 2018 h5ad (``KANG_URL``): its
        control cells with all genes (the curated file keeps 1,287 genes) into
        ``~/.cache/scfm_adapt``.

    Returns
    -------
    anndata.AnnData
        12,261 cells x 1,287 genes (the curated file). ``X``: integer counts (CSR float32).
        ``obs``: ``cluster_id`` (8 cell types), ``sample_id`` (8 donors, int), ``tsne1``,
        ``tsne2``. ``var``: symbols as index, ``feature``, ``ensembl_id``.

    Raises
    ------
    FileNotFoundError
        If the file is absent and ``download=False``.
    """
    f = _fetch(CTRL_FILE, KANG_URL, path, download, build=_build_ctrl)
    return _read_counts_h5ad(f, "kang2018_ctrl", ("cluster_id", "sample_id"))

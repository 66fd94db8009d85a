"""CellBench (Tian et al. 2019): 3 lung adenocarcinoma cell lines, 2 protocols."""

from __future__ import annotations

import os
from pathlib import Path

from ._io import _read_counts_h5ad, _write_h5ad
from ._paths import _fetch, _raw_download

CELLBENCH_FILE = "cellbench_3cellline_2protocols.h5ad"

#: LuyiTian/sc_mixology (MIT), data/csv: scPipe UMI counts (genes x cells, Ensembl ids) and
#: per-cell QC / demuxlet metadata, pinned to a commit. GEO: GSE118767.
CELLBENCH_URL = (
    "https://github.com/LuyiTian/sc_mixology/raw/19667e111aac52abbfcaa6fff07da2fd05984709/data/csv/"
)
#: protocol name -> file stem in CELLBENCH_URL
_PROTOCOLS = {"CELseq2": "sc_celseq2", "Dropseq": "sc_dropseq"}


def _read_protocol(counts_csv: Path, meta_csv: Path, protocol: str):
    """One protocol's AnnData (cells x genes) from the genes x cells count CSV and metadata."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    counts = pd.read_csv(counts_csv, index_col=0)
    meta = pd.read_csv(meta_csv, index_col=0)
    counts.columns = counts.columns.astype(str)
    meta.index = meta.index.astype(str)
    cells = meta.index[meta.index.isin(counts.columns)]
    X = sp.csr_matrix(counts[cells].to_numpy(dtype=np.float32).T)
    obs = meta.loc[cells].copy()
    obs.index = protocol + "_" + cells
    obs["protocol_batch"] = protocol
    var = pd.DataFrame(index=counts.index.astype(str))
    return ad.AnnData(X=X, obs=obs, var=var)


def _build(dest: Path, base_url: str | None = None) -> None:
    import anndata as ad

    base_url = base_url or CELLBENCH_URL

    parts = []
    for protocol, stem in _PROTOCOLS.items():
        c = _raw_download(base_url + f"{stem}.count.csv.gz", f"cellbench_{stem}.count.csv.gz")
        m = _raw_download(base_url + f"{stem}.metadata.csv.gz", f"cellbench_{stem}.metadata.csv.gz")
        parts.append(_read_protocol(c, m, protocol))
    a = ad.concat(parts, join="inner", merge=None)
    for k in a.obs.columns:
        if a.obs[k].dtype == object:
            a.obs[k] = a.obs[k].astype("category")
    a.uns["source"] = f"{base_url}{{sc_celseq2,sc_dropseq}}.{{count,metadata}}.csv.gz"
    _write_h5ad(a, dest)


def cellbench(path: str | os.PathLike | None = None, download: bool = False):
    """CellBench: 3 lung adenocarcinoma cell lines sequenced by CEL-seq2 and Drop-seq.

    Parameters
    ----------
    path
        The h5ad file (or a folder holding ``cellbench_3cellline_2protocols.h5ad``). Default:
        the data folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        If the file is not found, download the count and metadata CSVs of both protocols
        from ``CELLBENCH_URL`` and build the file (genes common to both) into
        ``~/.cache/scfm_adapt``.

    Returns
    -------
    anndata.AnnData
        499 cells x 15,073 genes (Ensembl ids). ``X``: integer UMI counts (CSR float32).
        ``obs``: ``cell_line_demuxlet`` (labels: ``H1975``, ``H2228``, ``HCC827``),
        ``protocol_batch`` (``CELseq2`` 274 / ``Dropseq`` 225, the batch), ``demuxlet_cls``
        (``SNG`` singlet / ``DBL`` doublet), ``cell_line``, scPipe QC columns.

    Raises
    ------
    FileNotFoundError
        If the file is absent and ``download=False``.
    """
    f = _fetch(CELLBENCH_FILE, CELLBENCH_URL, path, download, build=_build)
    return _read_counts_h5ad(
        f, "cellbench", ("cell_line_demuxlet", "protocol_batch", "demuxlet_cls")
    )

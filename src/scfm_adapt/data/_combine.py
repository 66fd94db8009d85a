"""Many h5ad files with different genes as one backed AnnData over one gene vocabulary.

:func:`combine_h5ad` streams each file's counts a block of rows at a time into one new
h5ad: columns re-indexed onto the vocabulary, each file a batch (``obs[batch_key]``), and
each file's gene panel in ``uns[BATCH_GENE_MASKS]`` (:mod:`._gene_panels`), so that a
model treats the genes a file lacks as unobserved rather than as zeros. Peak memory is a
block of counts plus the ``obs`` tables, whatever the number of cells.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import SCFMInputError, TooFewGenesError
from ._backed import existing_files, row_blocks
from ._checksums import file_sha256
from ._gene_panels import BATCH_GENE_MASKS
from ._validation import check_counts

logger = logging.getLogger(__name__)

#: Gene vocabularies :func:`combine_h5ad` builds itself (or pass a list of genes).
VOCABULARIES = ("union", "intersection")
#: Identifier types a file's genes can be mapped to (through the GO id table).
GENE_ID_TYPES = ("symbol", "ensembl")
#: Where the combined file records its sources (file, cells, genes observed, SHA-256).
SOURCES_KEY = "scfm_sources"


def _read_obs_var(path: Path) -> tuple[pd.DataFrame, pd.Index]:
    import anndata as ad
    import h5py

    with h5py.File(path, "r") as f:
        obs = ad.io.read_elem(f["obs"])
        var = ad.io.read_elem(f["var"]).index
    return obs, pd.Index([str(g) for g in var])


def _id_maps(kind: str) -> dict[str, str]:
    """Ensembl id -> symbol (``kind="symbol"``) or symbol -> Ensembl id, from the GO id
    table (:func:`scfm_adapt.datasets.go_gene_ids`; the first row of each id wins)."""
    from ..datasets import go_gene_ids

    table = go_gene_ids().dropna(subset=["ensembl", "symbol"])
    src, dst = ("ensembl", "symbol") if kind == "symbol" else ("symbol", "ensembl")
    table = table.drop_duplicates(src, keep="first")
    return dict(zip(table[src].astype(str), table[dst].astype(str)))


def _map_ids(genes: pd.Index, kind: str | None, maps: dict) -> pd.Index:
    """Each gene's identifier of type ``kind`` (unchanged where it already is one, or
    where the table has no match); an Ensembl version suffix (``.12``) is dropped."""
    if kind is None:
        return genes
    if kind not in maps:
        maps[kind] = _id_maps(kind)
    table = maps[kind]
    out = []
    for g in genes:
        key = g.split(".")[0] if g.startswith("ENS") else g
        out.append(table.get(key, key))
    return pd.Index(out)


def _vocabulary(genes_per_file: list[pd.Index], genes) -> list[str]:
    if isinstance(genes, str):
        if genes not in VOCABULARIES:
            raise ValueError(f"genes={genes!r}; choose one of {VOCABULARIES} or pass a list.")
        if genes == "union":
            seen: dict[str, None] = {}
            for g in genes_per_file:
                seen.update(dict.fromkeys(g))
            return list(seen)
        common = set(genes_per_file[0])
        for g in genes_per_file[1:]:
            common &= set(g)
        return [g for g in dict.fromkeys(genes_per_file[0]) if g in common]
    vocab = list(dict.fromkeys(str(g) for g in genes))
    if not vocab:
        raise SCFMInputError("genes is an empty list; give the gene vocabulary to use.")
    return vocab


def combine_h5ad(
    files: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    genes: str | Sequence[str] = "union",
    batch_key: str = "dataset",
    batch_labels: Sequence[str] | None = None,
    obs_keys: Sequence[str] | None = None,
    gene_ids: str | None = None,
    layer: str | None = None,
    min_genes_per_file: float = 0.1,
    block_size: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
):
    """Write ``files`` (h5ad, raw counts) as one h5ad over one gene vocabulary; open it
    backed.

    Parameters
    ----------
    files
        The h5ad files; they may measure different genes.
    out
        The h5ad to write (atomically: a temporary sibling renamed into place).
    genes
        ``"union"`` (every gene of any file, in order of first appearance),
        ``"intersection"`` (the genes of every file) or a list of genes.
    batch_key, batch_labels
        The ``obs`` column naming each cell's file, and the names (default: the file
        names without ``.h5ad``); each file is one batch of a model set up on it.
    obs_keys
        ``obs`` columns to keep (each must be in every file); default: the columns every
        file has.
    gene_ids
        Map every file's genes to ``"symbol"`` or ``"ensembl"`` ids through the GO id
        table before aligning (files naming genes differently); ``None`` keeps the names.
    layer
        The layer holding the counts in every file (``None``: ``X``).
    min_genes_per_file
        Smallest share of the vocabulary each file must measure.

    Returns
    -------
    The combined AnnData, backed (read-only). ``uns["scfm_batch_gene_masks"]`` holds each
    file's gene panel and ``uns["scfm_sources"]`` each file's path, cells, genes observed
    and SHA-256.
    """
    import anndata as ad
    import h5py
    from tqdm.auto import tqdm

    paths = existing_files(files, "combine_h5ad")
    if batch_labels is None:
        labels = [p.name.removesuffix(".h5ad") for p in paths]
    else:
        labels = [str(b) for b in batch_labels]
    if len(labels) != len(paths) or len(set(labels)) != len(labels):
        raise SCFMInputError(
            f"batch_labels must name each of the {len(paths)} files once; got {labels}. Two "
            "files with the same name need batch_labels=."
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True or another path.")
    if gene_ids is not None and gene_ids not in GENE_ID_TYPES:
        raise ValueError(f"gene_ids={gene_ids!r}; choose one of {GENE_ID_TYPES} or None.")

    maps: dict = {}
    obs_tables, genes_per_file = [], []
    for p in paths:
        obs, var = _read_obs_var(p)
        var = _map_ids(var, gene_ids, maps)
        if var.has_duplicates:
            dup = sorted(set(var[var.duplicated()]))
            how = " after mapping to gene_ids=" + repr(gene_ids) if gene_ids else ""
            raise SCFMInputError(
                f"{p.name} names {len(dup)} gene(s) more than once{how} (e.g. {dup[:5]}). "
                "Keep one column per gene first (sum or drop the duplicates), or pass "
                "gene_ids=None to keep the file's own names."
            )
        obs_tables.append(obs)
        genes_per_file.append(var)
    vocab = _vocabulary(genes_per_file, genes)
    if not vocab:
        raise TooFewGenesError(
            "The files share no genes (genes='intersection'); use genes='union', or "
            "gene_ids='symbol' if some files name genes by Ensembl id."
        )
    pos = {g: i for i, g in enumerate(vocab)}
    panels, sources = {}, {}
    for p, label, var in zip(paths, labels, genes_per_file):
        observed = np.zeros(len(vocab), dtype=bool)
        observed[[pos[g] for g in var if g in pos]] = True
        if observed.mean() < min_genes_per_file:
            raise TooFewGenesError(
                f"{p.name} measures {int(observed.sum())} of the {len(vocab)} vocabulary "
                f"genes ({observed.mean():.1%}; at least {min_genes_per_file:.0%} needed). "
                "Check its gene identifiers (gene_ids='symbol' maps Ensembl ids), or leave "
                "it out."
            )
        panels[label] = observed
    nobody = ~np.logical_or.reduce(list(panels.values()))
    if nobody.any():
        names = [vocab[i] for i in np.flatnonzero(nobody)[:5]]
        raise SCFMInputError(
            f"{int(nobody.sum())} of the {len(vocab)} genes are measured by no file (e.g. "
            f"{names}): a model could never learn them. Leave them out of genes=, or add a "
            "file that measures them."
        )
    keys = obs_keys
    if keys is None:
        keys = [c for c in obs_tables[0].columns if all(c in o.columns for o in obs_tables)]
    for k in keys:
        lacking = [p.name for p, o in zip(paths, obs_tables) if k not in o.columns]
        if lacking:
            raise SCFMInputError(f"obs column {k!r} is missing from {lacking}.")
    keys = [k for k in keys if k != batch_key]
    obs = pd.concat(
        [
            pd.DataFrame(
                {k: o[k].astype(str).to_numpy() for k in keys},
                index=[f"{label}-{n}" for n in o.index],
            )
            for o, label in zip(obs_tables, labels)
        ]
    )
    for k in keys:
        obs[k] = pd.Categorical(obs[k])
    obs[batch_key] = pd.Categorical(
        np.repeat(labels, [len(o) for o in obs_tables]), categories=labels
    )
    del obs_tables

    tmp = out.with_name(f".{out.name}.tmp")
    total = int(obs.shape[0])
    bar = tqdm(total=total, desc="combining files", unit="cells", disable=not progress)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            ad.io.write_elem(f, "obs", obs)
            ad.io.write_elem(f, "var", pd.DataFrame(index=pd.Index(vocab)))
            for name in ("obsm", "varm", "obsp", "varp", "layers"):
                ad.io.write_elem(f, name, {})
            x = None
            for p, label, var in zip(paths, labels, genes_per_file):
                a = ad.read_h5ad(p, backed="r")
                try:
                    matrix = a.X if layer is None else a.layers[layer]
                    dst = np.array([pos.get(g, -1) for g in var])
                    keep = np.flatnonzero(dst >= 0)
                    dst_keep = dst[keep]  # each kept column's place in the vocabulary
                    for _, block in row_blocks(matrix, block_size):
                        block = sparse.csr_matrix(block, dtype=np.float32)
                        check_counts(block, where=f"{p.name} ({'X' if layer is None else layer})")
                        block = block[:, keep]
                        block = sparse.csr_matrix(
                            (block.data, dst_keep[block.indices], block.indptr),
                            shape=(block.shape[0], len(vocab)),
                        )
                        block.sort_indices()  # the vocabulary orders columns otherwise
                        if x is None:
                            ad.io.write_elem(f, "X", block)
                            x = ad.io.sparse_dataset(f["X"])
                        else:
                            x.append(block)
                        bar.update(block.shape[0])
                finally:
                    a.file.close()
                sources[label] = {
                    "file": str(p.resolve()),
                    "n_cells": int(a.n_obs),
                    "n_genes": len(var),
                    "n_genes_observed": int(panels[label].sum()),
                    "file_sha256": file_sha256(p),
                }
            uns = {
                BATCH_GENE_MASKS: {"batch_key": batch_key, "observed": panels},
                SOURCES_KEY: sources,
            }
            ad.io.write_elem(f, "uns", uns)
        tmp.replace(out)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    shares = ", ".join(f"{k} {v['n_genes_observed']}" for k, v in sources.items())
    logger.info("Combined %d cells over %d genes (genes observed: %s).", total, len(vocab), shares)
    return ad.read_h5ad(out, backed="r")

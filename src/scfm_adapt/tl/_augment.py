"""``sfa.tl.augment``: rare groups topped up with generated cells, in a new AnnData."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from .._slots import SLOTS

logger = logging.getLogger(__name__)


def augment(
    adata: AnnData,
    model,
    *,
    groupby: str,
    min_cells: int,
    key_added: str = SLOTS.generated,
    guidance_scale: float | dict = 1.0,
    n_steps: int = 50,
    seed: int | None = 0,
    **generate_kwargs,
) -> AnnData:
    """Top up rare groups with generated cells: every group of ``groupby`` with fewer than
    ``min_cells`` cells gets ``min_cells - n`` cells from ``model.generate``.

    Each generated cell takes its other conditions (batch, covariates) from a random real
    cell of the same group, so the added cells mirror the group's mix of batches.

    Parameters
    ----------
    adata
        Cells with the model's genes; ``groupby`` must be a condition of the model (its
        ``labels_key``, ``batch_key`` or a categorical covariate).
    model
        A trained :class:`~scfm_adapt.model.SCFM` (both stages).
    min_cells
        Target size of every group.
    key_added
        Boolean ``obs`` column marking the generated cells.
    guidance_scale, n_steps, seed, **generate_kwargs
        Passed to :meth:`~scfm_adapt.model.SCFM.generate`.

    Returns
    -------
    A new AnnData: the real cells first, then the generated ones. Counts of generated cells
    go where the model reads counts (``X`` or its layer); ``X`` and other layers, when they
    are not the counts, hold ``log1p`` of counts per 10,000 for generated cells; ``obsm``
    entries are NaN for them and ``obsp`` graphs are dropped (recompute neighbours).
    ``obs[key_added]`` marks generated cells and ``uns["scfm_augment"]`` lists how many
    were added per group.
    """
    import anndata as ad
    from scipy import sparse

    from ..data import check_genes
    from ..metrics import lognorm

    known = model.conditions_
    if groupby not in known or not known[groupby].categorical:
        cats = [k for k, c in known.items() if c.categorical]
        raise ValueError(
            f"groupby={groupby!r} is not a categorical condition of the model; it can "
            f"generate by {cats} (the keys given to setup_anndata)."
        )
    if groupby not in adata.obs:
        raise KeyError(f"{groupby!r} is not a column of adata.obs.")
    if min_cells < 1:
        raise ValueError(f"min_cells={min_cells}; use a positive number.")
    check_genes(adata.var_names, model.var_names_)
    groups = adata.obs[groupby].astype(str)
    sizes = groups.value_counts()
    need = {g: int(min_cells - n) for g, n in sizes.items() if 0 < n < min_cells}
    layer = model.registry_["setup_args"].get("layer")
    params = {
        "groupby": groupby,
        "min_cells": min_cells,
        "added": need,
        "guidance_scale": guidance_scale,
        "n_steps": n_steps,
        "seed": seed,
    }
    out = adata.copy()
    out.obs[key_added] = False
    if not need:
        logger.info("every group of %r has at least %d cells: nothing added", groupby, min_cells)
        out.uns[SLOTS.augment] = {"params": params}
        return out
    rng = np.random.default_rng(seed)
    keys = [k for k in known if k in adata.obs]
    rows = []
    for g, k in need.items():
        pool = np.flatnonzero((groups == g).to_numpy())
        rows.append(adata.obs.iloc[rng.choice(pool, k)][keys])
    conditions = pd.concat(rows).reset_index(drop=True)
    gen = model.generate(
        conditions, guidance_scale=guidance_scale, n_steps=n_steps, seed=seed, **generate_kwargs
    )
    counts = gen.X
    normalized = sparse.csr_matrix(lognorm(counts).astype(np.float32))
    new = ad.AnnData(
        X=counts if layer is None else _like(adata.X, normalized),
        obs=gen.obs.drop(columns=[c for c in gen.obs if c not in adata.obs]),
        var=adata.var.copy(),
    )
    new.obs_names = [f"{key_added}_{i}" for i in range(new.n_obs)]
    for name, value in adata.layers.items():
        new.layers[name] = _like(value, counts if name == layer else normalized)
    for name, value in adata.obsm.items():
        width = value.shape[1] if value.ndim > 1 else None
        shape = (new.n_obs, width) if width else (new.n_obs,)
        if isinstance(value, pd.DataFrame):
            new.obsm[name] = pd.DataFrame(np.nan, index=new.obs_names, columns=value.columns)
        else:
            new.obsm[name] = np.full(shape, np.nan, dtype=np.float32)
    new.obs[key_added] = True
    merged = ad.concat([out, new], join="outer", merge="same", index_unique=None)
    for key, cond in known.items():
        if key in merged.obs and cond.categorical and key in adata.obs:
            if isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
                cats = list(adata.obs[key].cat.categories)
                extra = [c for c in merged.obs[key].astype(str).unique() if c not in cats]
                merged.obs[key] = pd.Categorical(
                    merged.obs[key].astype(str), categories=cats + extra
                )
    merged.obs[key_added] = merged.obs[key_added].astype(bool)
    merged.uns = {**adata.uns, SLOTS.augment: {"params": params}}
    logger.info("added %d generated cells to %d groups of %r", new.n_obs, len(need), groupby)
    return merged


def _like(reference, values):
    """``values`` (sparse) in the storage kind of ``reference`` (dense or sparse)."""
    from scipy import sparse

    if sparse.issparse(reference):
        return sparse.csr_matrix(values)
    return values.toarray() if sparse.issparse(values) else np.asarray(values)

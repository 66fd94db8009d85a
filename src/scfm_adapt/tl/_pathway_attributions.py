"""``sfa.tl.pathway_attributions``: which pathway tokens drive each cell's result."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from .._slots import SLOTS

logger = logging.getLogger(__name__)


def top_pathways(attributions: pd.DataFrame, groups: pd.Series, n_top: int = 5) -> pd.DataFrame:
    """The ``n_top`` pathways of each group by mean absolute attribution.

    Parameters
    ----------
    attributions
        Cells × pathways (as from ``get_pathway_attributions``).
    groups
        Group of each cell, indexed like ``attributions``.
    n_top
        Pathways per group.

    Returns
    -------
    pandas.DataFrame
        Columns ``group``, ``rank`` (1 = strongest), ``pathway``, ``mean_abs`` (mean
        absolute attribution), ``mean`` (mean signed attribution), ``share`` (the pathway's
        part of the group's summed mean absolute attribution) and ``n_cells``.
    """
    groups = pd.Series(np.asarray(groups), index=attributions.index).astype(str)
    rows = []
    for group, idx in groups.groupby(groups, sort=True).groups.items():
        a = attributions.loc[idx]
        mean_abs = a.abs().mean(0)
        total = float(mean_abs.sum()) or 1.0
        for rank, (name, value) in enumerate(mean_abs.nlargest(n_top).items(), start=1):
            rows.append(
                {
                    "group": group,
                    "rank": rank,
                    "pathway": str(name),
                    "mean_abs": float(value),
                    "mean": float(a[name].mean()),
                    "share": float(value) / total,
                    "n_cells": len(idx),
                }
            )
    return pd.DataFrame(rows)


def pathway_attributions(
    adata: AnnData,
    model,
    *,
    groupby: str | None = None,
    n_top: int = 5,
    key_added: str = SLOTS.pathways,
    n_steps: int = 32,
    batch_size: int = 128,
    copy: bool = False,
    **kwargs,
) -> AnnData | None:
    """Write each cell's pathway attributions into ``adata.obsm[key_added]``.

    Integrated gradients of the model's own target with respect to its pathway tokens
    (models built with ``tokenizer="pathway"``): for an :class:`~scfm_adapt.model.SCFM`
    the distance of the cell's embedding from the average training cell's, for a
    :class:`~scfm_adapt.model.CellAnnotator` the logit of the predicted type (or
    ``label=``), for a :class:`~scfm_adapt.model.PerturbationModel` the predicted response
    to ``perturbation=`` of these (control) cells. Each row sums to the change of the
    target from its baseline, up to the completeness gap.

    Parameters
    ----------
    adata
        Cells with the model's genes (for a ``PerturbationModel``: control cells).
    model
        A trained model on a pathway-token backbone.
    groupby
        An ``obs`` column; the top pathways of each group go to ``uns[key_added]["top"]``
        (see :func:`top_pathways`) and ``sfa.pl.pathway_attributions`` draws them.
    n_top
        Pathways per group.
    key_added
        Name of the ``obsm`` slot and of the ``uns`` entry.
    n_steps, batch_size
        Integrated-gradient steps and cells per batch.
    copy
        Return a modified copy instead of writing into ``adata``.
    **kwargs
        Passed to the model's ``get_pathway_attributions`` (``label=``, ``perturbation=``,
        ``genes=`` ...).

    Returns
    -------
    ``None`` (or the copy), having written:

    ``obsm[key_added]``
        ``(n_cells, n_pathways)`` attributions, float32.
    ``obs[key_added + "_gap"]``
        Each cell's completeness gap (the quadrature error of the integral).
    ``uns[key_added]``
        ``"names"`` (the pathways, in column order), ``"params"`` and, with ``groupby``,
        ``"top"``.
    """
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(
            f"groupby={groupby!r} is not a column of adata.obs ({list(adata.obs.columns)[:8]})."
        )
    adata = adata.copy() if copy else adata
    df = model.get_pathway_attributions(adata, n_steps=n_steps, batch_size=batch_size, **kwargs)
    if len(df) != adata.n_obs:
        raise ValueError(
            f"The model returned attributions for {len(df)} of {adata.n_obs} cells; pass the "
            "cells to attribute as adata (no indices=)."
        )
    adata.obsm[key_added] = df.to_numpy(dtype=np.float32)
    adata.obs[f"{key_added}_gap"] = np.asarray(df.attrs["completeness_gap"], dtype=np.float32)
    entry: dict = {
        "names": [str(c) for c in df.columns],
        "params": {
            "model": type(model).__name__,
            "n_steps": n_steps,
            **{k: v for k, v in kwargs.items() if isinstance(v, str | int | float | bool)},
        },
    }
    if groupby is not None:  # a plain frame: pandas trips over the array in df.attrs
        frame = pd.DataFrame(adata.obsm[key_added], index=adata.obs_names, columns=df.columns)
        entry["top"] = top_pathways(frame, adata.obs[groupby], n_top)
        entry["params"]["groupby"] = groupby
    adata.uns[key_added] = entry
    logger.info("added obsm[%r] (%d pathways) and uns[%r]", key_added, df.shape[1], key_added)
    return adata if copy else None

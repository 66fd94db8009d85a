"""What a model reads from a user's AnnData: an *input shell*, never the object itself.

scvi-tools registers every AnnData it reads: it writes ``_scvi_*`` columns into ``obs`` and
keys into ``uns``, and turns a view into a copy in place. A model given a foreign AnnData
(one it was not set up on) registers a shell instead: a new AnnData over the same counts
(shared, not copied: sparse, dense or backed) with only the ``obs`` columns the model was
set up with. The user's object is never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from anndata import AnnData

from ...data import (
    check_counts,
    check_genes,
    check_unique_names,
    gene_order,
    get_matrix,
    is_backed,
)
from ...errors import GeneMismatchError, MissingKeyError, UnknownCategoryError

#: ``uns`` key of a shell: the id of the model it was built for.
SHELL_OF = "_scfm_shell_of"


#: How to get past a category the model never saw (a model class may name its own way).
UNKNOWN_CATEGORY_FIX = (
    "drop those cells, relabel them to a known category, or map the data as a query onto "
    "the model (SCFM.load_query_data extends the categories)"
)


def transfer_errors(fn: Callable, *args, fix: str = UNKNOWN_CATEGORY_FIX, **kwargs):
    """Run a registry transfer and turn scvi-tools' unknown-category error into ours,
    whose message ends with ``fix``."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        if "not found in source registry" in str(e) or "Cannot transfer" in str(e):
            raise UnknownCategoryError(
                "adata holds a category the model never saw (scvi-tools: "
                f"{str(e).split(' Cannot transfer')[0]}). The model only knows the categories "
                f"it was trained with: {fix}."
            ) from e
        raise


def setup_obs_keys(setup_args: dict) -> list[str]:
    """The ``obs`` columns a model was set up with (batch, labels, covariates), in order."""
    keys = [
        setup_args.get("batch_key"),
        setup_args.get("labels_key"),
        *(setup_args.get("categorical_covariate_keys") or []),
        *(setup_args.get("continuous_covariate_keys") or []),
    ]
    return list(dict.fromkeys(k for k in keys if k is not None))


def copied_obs(adata: AnnData, keys: Sequence[str]) -> pd.DataFrame:
    """The columns ``keys`` of ``adata.obs`` (categories kept), or a named error."""
    missing = [k for k in keys if k not in adata.obs]
    if missing:
        raise MissingKeyError(
            f"adata.obs lacks {missing}, which this model was set up with (see "
            "model.registry_['setup_args']). Add the column(s) with the values of these "
            "cells; where a call does not use them (embeddings do not use labels), any "
            "category the model knows will do."
        )
    obs = pd.DataFrame({k: adata.obs[k].to_numpy() for k in keys}, index=adata.obs_names.copy())
    for k in obs:
        if isinstance(adata.obs[k].dtype, pd.CategoricalDtype):
            obs[k] = pd.Categorical(obs[k], categories=adata.obs[k].cat.categories)
    return obs


def input_shell(
    adata: AnnData,
    *,
    layer: str | None,
    var_names: Sequence[str],
    obs: Callable[[AnnData], pd.DataFrame],
    owner: str,
    reorder: bool = True,
    what: str = "model",
) -> AnnData:
    """A new AnnData over ``adata``'s counts (``X`` or ``layer``) for scvi-tools to register,
    with the ``obs`` that ``obs(adata)`` gives (read after the genes and counts are checked).

    The counts are checked (integers, finite, non-negative) and shared, except when the
    genes come in another order than ``var_names``: with ``reorder`` the shell holds them
    reordered (so results are identical), otherwise that is a
    :class:`~scfm_adapt.errors.GeneMismatchError` like any other gene difference (its
    message names ``what`` as the owner of the genes).
    """
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    if not reorder:
        check_genes(adata.var_names, var_names, what=what)
    matrix = get_matrix(adata, layer)
    order = gene_order(adata.var_names, var_names) if reorder else None
    check_unique_names(adata)
    check_counts(matrix, where)
    if order is not None:
        if is_backed(matrix):
            raise GeneMismatchError(
                "This backed AnnData has the model's genes in another order, which cannot "
                "be reordered on disk. Write a reordered copy first: "
                "`adata[:, model.var_names_].to_memory().write_h5ad(...)`."
            )
        matrix = matrix[:, order]
    shell = AnnData(
        X=matrix if layer is None else None,
        obs=obs(adata),
        var=pd.DataFrame(index=pd.Index(list(var_names))),
        layers=None if layer is None else {layer: matrix},
    )
    shell.uns[SHELL_OF] = owner
    return shell

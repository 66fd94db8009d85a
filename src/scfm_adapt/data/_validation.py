"""Checks run on user data before a model touches it. Messages say what is wrong and the fix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from ..errors import (
    DuplicateNamesError,
    GeneMismatchError,
    InvalidCountsError,
    MissingKeyError,
    SCFMInputError,
)


def get_matrix(adata, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer.

    A dense matrix of a view (anndata's ``ArrayView``) comes back as a plain array, which
    scvi-tools' loaders read like any other."""
    if layer is None:
        if adata.X is None:
            raise InvalidCountsError("adata.X is empty; pass `layer=` naming the counts layer.")
        return _plain(adata.X)
    if layer not in adata.layers:
        raise MissingKeyError(
            f"Layer {layer!r} not found in adata.layers (has {list(adata.layers)}). "
            "Pass the name of the layer holding raw counts, or layer=None for adata.X."
        )
    return _plain(adata.layers[layer])


def _plain(matrix):
    return np.asarray(matrix) if type(matrix).__name__ == "ArrayView" else matrix


def _values(matrix, chunk: int = 4096):
    """Yield the stored values of a dense, sparse or backed matrix, a block of rows at a time
    (the non-zeros only of sparse blocks, so a backed sparse atlas is never densified)."""
    if sparse.issparse(matrix):
        yield np.asarray(matrix.data)
        return
    n = matrix.shape[0]
    for start in range(0, n, chunk):
        block = matrix[start : start + chunk]
        yield np.asarray(block.data if sparse.issparse(block) else block)


def check_counts(matrix, where: str = "adata.X") -> None:
    """Raise :class:`~scfm_adapt.errors.InvalidCountsError` unless ``matrix`` holds raw counts.

    Checks for NaN/inf, negative and non-integer values. Sparse matrices are checked on
    their stored values only, so this costs one pass over the non-zeros.
    """
    if 0 in matrix.shape:
        raise InvalidCountsError(
            f"{where} is empty (shape {matrix.shape}); select at least one cell and one gene."
        )
    for vals in _values(matrix):
        if vals.size == 0:
            continue
        if not np.issubdtype(vals.dtype, np.number):
            raise InvalidCountsError(f"{where} has non-numeric dtype {vals.dtype}.")
        if np.issubdtype(vals.dtype, np.floating):
            if not np.isfinite(vals).all():
                raise InvalidCountsError(
                    f"{where} contains NaN or infinite values; a count likelihood needs "
                    "finite raw counts. Remove or fill those entries first."
                )
            frac = vals != np.round(vals)
            if frac.any():
                raise InvalidCountsError(
                    f"{where} contains non-integer values (e.g. {vals[frac][0]:.4g})"
                    "; NB/ZINB/Poisson likelihoods need raw counts. Pass the raw counts "
                    "(often adata.layers['counts'] or adata.raw) through `layer=`, not "
                    "normalised or log-transformed data."
                )
        if (vals < 0).any():
            raise InvalidCountsError(
                f"{where} contains negative values; raw counts are >= 0. Pass the raw "
                "counts through `layer=`, not scaled or centred data."
            )


def check_obs_keys(obs, keys, where: str = "adata.obs", hint: str = "") -> None:
    """Raise :class:`~scfm_adapt.errors.MissingKeyError` naming the first of ``keys``
    (``None`` skipped) that is not a column of ``obs``, with its columns and ``hint``."""
    for key in keys:
        if key is not None and key not in obs:
            raise MissingKeyError(
                f"{key!r} is not a column of {where} (columns: {list(obs.columns)}). {hint}".strip()
            )


def check_layer_counts(adata, layer: str | None) -> None:
    """:func:`check_counts` on ``adata.X`` or ``adata.layers[layer]``, naming the slot."""
    check_counts(get_matrix(adata, layer), f"adata.layers[{layer!r}]" if layer else "adata.X")


def check_genes(var_names: Sequence[str], reference: Sequence[str], what: str = "model") -> None:
    """Raise :class:`~scfm_adapt.errors.GeneMismatchError` unless the genes equal ``reference``.

    Same genes in another order and missing or extra genes get different messages and fixes.
    """
    var_names, reference = list(map(str, var_names)), list(map(str, reference))
    if var_names == reference:
        return
    query, ref = set(var_names), set(reference)
    if len(query) != len(var_names):
        raise DuplicateNamesError(
            "adata.var_names has duplicates; call adata.var_names_make_unique() first."
        )
    if query == ref:
        raise GeneMismatchError(
            f"adata has the {what}'s genes in another order. Reorder them with "
            f"`adata = adata[:, {what}_var_names].copy()`."
        )
    missing, extra = (
        [g for g in reference if g not in query],
        [g for g in var_names if g not in ref],
    )
    raise GeneMismatchError(
        f"adata's genes differ from the {what}'s: {len(missing)} of its {len(reference)} genes "
        f"are missing (e.g. {missing[:5]}) and {len(extra)} are extra (e.g. {extra[:5]}). "
        f"Subset or reorder adata to the {what}'s genes (`adata[:, var_names]`) when it "
        "has them all; otherwise align it with `scfm_adapt.data.align_genes(adata, "
        "model.var_names_)` (missing genes are masked) and map it onto the model with "
        "`SCFM.load_query_data`."
    )


def gene_order(var_names: Sequence[str], reference: Sequence[str]) -> np.ndarray | None:
    """``None`` when ``var_names`` equal ``reference``; the positions that reorder them to
    ``reference`` when they hold the same genes in another order; otherwise
    :func:`check_genes`'s error (duplicates, missing or extra genes)."""
    names = pd.Index(list(map(str, var_names)))
    ref = pd.Index(list(map(str, reference)))
    if names.equals(ref):
        return None
    if names.is_unique and len(names) == len(ref) and names.isin(ref).all():
        return names.get_indexer(ref)
    check_genes(names, ref)
    raise AssertionError("unreachable: check_genes raises for any other difference")


def check_unique_names(adata) -> None:
    """Raise :class:`~scfm_adapt.errors.DuplicateNamesError` on duplicated cell or gene names."""
    for axis, fix in (("obs", "obs_names_make_unique"), ("var", "var_names_make_unique")):
        names = getattr(adata, f"{axis}_names")
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:3].tolist()
            raise DuplicateNamesError(
                f"adata.{axis}_names has duplicates (e.g. {dup}); call adata.{fix}() first."
            )


def check_not_view(adata, what: str = "setup_anndata") -> None:
    """Raise :class:`~scfm_adapt.errors.SCFMInputError` for a view: set-up data must be an
    AnnData of its own, because the registration writes into it."""
    if getattr(adata, "is_view", False):
        raise SCFMInputError(
            f"adata is a view (a subset of another AnnData); {what} registers the data on the "
            "object itself, which a view cannot hold. Call `adata = adata.copy()` first."
        )

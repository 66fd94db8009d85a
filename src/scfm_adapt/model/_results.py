"""The new AnnData / MuData objects of cells that models return: generated,
counterfactual and predicted perturbed cells, with their slots named by
:data:`scfm_adapt._slots.SLOTS`.

Models never write into a user's AnnData: they return new objects, built here. The
``sfa.tl`` functions are the one writer of results into the user's AnnData.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._slots import SLOTS


def cells_anndata(
    counts: np.ndarray,
    expected: np.ndarray,
    obs: pd.DataFrame,
    var_names: Sequence[str],
    uns: dict | None = None,
) -> AnnData:
    """Cells a model returns: sampled counts in ``X`` (CSR float32 holding integers), the
    decoder's mean in ``layers[SLOTS.expected]``."""
    out = AnnData(
        X=sparse.csr_matrix(np.asarray(counts).astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(list(var_names))),
        layers={SLOTS.expected: np.asarray(expected).astype(np.float32)},
    )
    out.uns.update(uns or {})
    return out


def modalities_mudata(
    rna: AnnData,
    extra: dict[str, tuple[np.ndarray, np.ndarray]],
    modality_names: dict[str, str],
    feature_names: dict[str, Sequence[str]],
):
    """Generated RNA and further modalities (role → counts, means) as one MuData of paired
    cells; ``obs`` and ``uns`` are the RNA's."""
    from mudata import MuData

    mods = {modality_names["rna"]: rna}
    for role, (counts, mean) in extra.items():
        mods[modality_names[role]] = cells_anndata(
            counts, mean, pd.DataFrame(index=rna.obs_names), feature_names[role]
        )
    mdata = MuData(mods)
    for col in rna.obs.columns:
        mdata.obs[col] = rna.obs[col].to_numpy()
    mdata.uns.update(rna.uns)
    return mdata


def perturbation_anndata(
    counts: Sequence[sparse.spmatrix],
    expected: Sequence[np.ndarray],
    obs: pd.DataFrame,
    var_names: Sequence[str],
    requests: Sequence[str],
    deltas: Sequence[np.ndarray],
    lower: Sequence[np.ndarray],
    upper: Sequence[np.ndarray],
    uns: dict,
) -> AnnData:
    """Predicted perturbed cells: counts and expected counts of every request's cells, and
    per gene and request the predicted mean change with its interval in ``varm``
    (genes × requests DataFrames)."""
    var = pd.DataFrame(index=pd.Index(list(var_names)))
    out = AnnData(X=sparse.vstack(counts).tocsr(), obs=obs, var=var)
    out.layers[SLOTS.expected] = np.concatenate(expected)
    labels = list(requests)
    for key, values in (
        (SLOTS.delta, deltas),
        (SLOTS.delta_lower, lower),
        (SLOTS.delta_upper, upper),
    ):
        out.varm[key] = pd.DataFrame(np.stack(values, 1), index=var.index, columns=labels)
    out.uns[SLOTS.perturbation] = uns
    return out

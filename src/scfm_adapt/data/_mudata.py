"""Pairing the modalities of a MuData: every modality over the same cells, in one order."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse


def _padded(mod, obs_names: pd.Index):
    """``mod`` over ``obs_names``: its own cells where it has them, all-zero rows elsewhere."""
    from anndata import AnnData

    pos = mod.obs_names.get_indexer(obs_names)
    have = pos >= 0
    x = sparse.csr_matrix(mod.X) if mod.X is not None else None
    rows = np.where(have, pos, 0)
    scale = sparse.diags(have.astype(np.float32))
    out = AnnData(
        X=(scale @ x[rows]).tocsr().astype(np.float32) if x is not None else None,
        obs=pd.DataFrame(index=obs_names),
        var=mod.var.copy(),
        layers={
            k: (scale @ sparse.csr_matrix(v)[rows]).tocsr().astype(np.float32)
            for k, v in mod.layers.items()
        },
    )
    for col in mod.obs.columns:
        out.obs[col] = mod.obs[col].reindex(obs_names).to_numpy()
    return out


def pair_modalities(mdata, obs_key_prefix: str = "scfm_has_"):
    """A fully paired copy of ``mdata``: each modality over all of its cells.

    A cell that a modality lacks gets an all-zero row in it (``X`` and every layer), and
    ``obs[obs_key_prefix + name]`` records which cells each modality really has. The SCFM
    reads an all-zero row as a *missing* modality and masks it (it is never treated as
    measured zeros), so this is how cells measured in one modality only join a multimodal
    model. scvi-tools' data fields need paired modalities, which this provides.

    Parameters
    ----------
    mdata
        A MuData whose modalities may cover different cells.
    obs_key_prefix
        Prefix of the ``obs`` columns marking the cells each modality has.

    Returns
    -------
    A new :class:`mudata.MuData` (``mdata`` is not modified).
    """
    from mudata import MuData

    obs_names = pd.Index(mdata.obs_names)
    mods, has = {}, {}
    for name, mod in mdata.mod.items():
        mods[name] = _padded(mod, obs_names)
        has[name] = obs_names.isin(mod.obs_names)
    out = MuData(mods)
    for col in mdata.obs.columns:
        if not any(col.startswith(f"{m}:") for m in mdata.mod):
            out.obs[col] = mdata.obs[col].to_numpy()
    for name, mask in has.items():
        out.obs[f"{obs_key_prefix}{name}"] = mask
    return out

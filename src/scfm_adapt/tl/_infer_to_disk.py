"""Inference over atlases larger than memory: chunks of cells in, an h5ad on disk out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._slots import SLOTS

logger = logging.getLogger(__name__)


def infer_to_disk(
    adata: AnnData,
    model,
    path: str | Path,
    *,
    embedding: bool = True,
    normalized: bool = False,
    library_size: float = 1e4,
    key_added: str = SLOTS.embedding,
    chunk_size: int = 10_000,
    batch_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Embed (and denoise) every cell a chunk at a time, writing the results to an h5ad.

    Memory is bounded by ``chunk_size`` cells × genes, whatever the number of cells, so this
    works on a backed AnnData (``anndata.read_h5ad(..., backed="r")`` or
    :func:`scfm_adapt.data.read_backed`) larger than memory. The file is written under a
    temporary name and renamed when complete: an interrupted run leaves no partial ``path``.

    Parameters
    ----------
    adata
        AnnData (in memory or backed) with the model's genes.
    model
        A trained :class:`~scfm_adapt.model.SCFM`.
    path
        The ``.h5ad`` to write. Its ``obs`` is ``adata.obs``, its ``var`` the model's genes.
    embedding
        Write the embedding to ``obsm[key_added]`` (as :func:`embed`).
    normalized
        Write the denoised expression at ``library_size`` counts per cell as ``X`` (dense
        float32, as :func:`normalize_expression`); read it lazily with ``backed="r"``.
    chunk_size
        Cells per chunk (each chunk is computed and written before the next is read).
    batch_size
        Minibatch size of the model within a chunk.

    Returns
    -------
    The path written. Load the embedding into ``adata`` with
    ``adata.obsm["X_scfm"] = anndata.read_h5ad(path).obsm["X_scfm"]``.
    """
    import h5py

    if not (embedding or normalized):
        raise ValueError("Nothing to write: set embedding=True and/or normalized=True.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; use a positive number of cells.")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or another path.")
    n, genes = adata.n_obs, list(model.var_names_)
    tmp = path.with_name(path.name + ".tmp")
    params = {
        "model": type(model).__name__,
        "embedding": key_added if embedding else None,
        "normalized_library_size": float(library_size) if normalized else None,
        "chunk_size": int(chunk_size),
    }
    starts = range(0, n, chunk_size)
    bar = None
    try:
        # Genes and counts are checked once, before any file is written; the chunks skip it.
        with model._trusting(adata):
            obs = adata.obs.loc[:, [c for c in adata.obs.columns if not c.startswith("_scvi")]]
            skeleton = AnnData(obs=pd.DataFrame(obs), var=pd.DataFrame(index=genes))
            skeleton.uns[SLOTS.inference] = {"params": {k: v for k, v in params.items() if v}}
            skeleton.write_h5ad(tmp)
            with h5py.File(tmp, "r+") as f:
                emb = x = None
                if embedding:
                    d = model.module.n_tokens * model.module.token_dim  # tokens joined
                    emb = f["obsm"].create_dataset(
                        key_added, (n, d), dtype="f4", chunks=(min(n, chunk_size), d)
                    )
                    emb.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                if normalized:
                    x = f.create_dataset(
                        "X", (n, len(genes)), dtype="f4", chunks=(min(n, 1024), len(genes))
                    )
                    x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                if progress:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=n, desc="inference to disk", unit="cell")
                for start in starts:
                    idx = np.arange(start, min(n, start + chunk_size))
                    rows = slice(idx[0], idx[-1] + 1)
                    if emb is not None:
                        emb[rows] = model.get_latent_representation(
                            adata, indices=idx, batch_size=batch_size
                        )
                    if x is not None:
                        x[rows] = model.get_normalized_expression(
                            adata,
                            indices=idx,
                            library_size=library_size,
                            batch_size=batch_size,
                            return_numpy=True,
                        )
                    if bar is not None:
                        bar.update(len(idx))
        tmp.replace(path)
    finally:
        if bar is not None:
            bar.close()
        tmp.unlink(missing_ok=True)
    logger.info("wrote %d cells to %s", n, path)
    return path

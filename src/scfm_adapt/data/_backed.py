"""Atlases larger than memory: backed h5ad files, and counts summed a block of rows at a time.

Training and inference read a backed AnnData through scvi-tools' loaders, one minibatch of
rows at a time, so memory is bounded by the batch and the model rather than by the data.
What else must see every cell (library and gene totals) goes through :func:`row_blocks`;
the count checks read backed matrices a block of rows at a time too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import sparse


def is_backed(matrix) -> bool:
    """Whether ``matrix`` is on disk (an h5py dataset or anndata's backed sparse dataset)."""
    return not (isinstance(matrix, np.ndarray) or sparse.issparse(matrix))


def row_blocks(matrix, block_size: int = 16384) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows)`` for consecutive blocks of rows; sparse blocks stay sparse.

    An in-memory matrix is yielded whole (``start=0``); a backed one one block at a time.
    """
    if not is_backed(matrix):
        yield 0, matrix
        return
    for start in range(0, matrix.shape[0], block_size):
        yield start, matrix[start : start + block_size]


def matrix_sums(matrix, block_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Row and column sums (float64) of a dense, sparse or backed matrix, one pass."""
    rows = np.zeros(matrix.shape[0], dtype=np.float64)
    cols = np.zeros(matrix.shape[1], dtype=np.float64)
    for start, block in row_blocks(matrix, block_size):
        r = np.asarray(block.sum(1), dtype=np.float64).ravel()
        rows[start : start + len(r)] = r
        cols += np.asarray(block.sum(0), dtype=np.float64).ravel()
    return rows, cols


def existing_files(paths: Sequence[str | Path], who: str) -> list[Path]:
    """``paths`` as :class:`~pathlib.Path`; an error naming what is missing (or that
    nothing was given)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"{who} needs at least one .h5ad path.")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"No such h5ad file(s): {missing}")
    return paths


def read_backed(
    paths: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
):
    """Open one h5ad, or a collection of them, as one backed AnnData (read-only).

    Parameters
    ----------
    paths
        An ``.h5ad`` file, or several with the same genes in the same order.
    out
        For several files: where :func:`anndata.experimental.concat_on_disk` writes their
        concatenation (streamed, never fully in memory; ``obs`` keeps the columns that
        every file has, and ``obs["dataset"]`` names each cell's file). Not used for one file.
    overwrite
        Replace an existing ``out``.

    Returns
    -------
    AnnData in backed mode (``adata.isbacked``), ready for ``SCFM.setup_anndata``.
    """
    import anndata as ad
    import h5py

    if isinstance(paths, str | Path):
        paths = [paths]
    paths = existing_files(paths, "read_backed")
    if len(paths) == 1:
        return ad.read_h5ad(paths[0], backed="r")
    if out is None:
        raise ValueError(
            f"{len(paths)} files need `out=`: the path of the concatenated h5ad to write "
            "(it is streamed from the inputs, so it can be larger than memory)."
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True or another `out`.")
    genes = None
    for p in paths:
        with h5py.File(p, "r") as f:
            var = ad.io.read_elem(f["var"]).index
        if genes is None:
            genes = var
        elif not var.equals(genes):
            raise ValueError(
                f"{p} has other genes than {paths[0]} ({len(var)} vs {len(genes)}, or another "
                "order). Subset every file to the same genes in the same order first."
            )
    from anndata.experimental import concat_on_disk

    tmp = out.with_name(f"{out.stem}.tmp{out.suffix}")  # the suffix picks h5ad vs zarr
    try:
        concat_on_disk(
            [str(p) for p in paths],
            str(tmp),
            join="inner",
            label="dataset",
            keys=[p.stem for p in paths],
            index_unique="-",
        )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return ad.read_h5ad(out, backed="r")

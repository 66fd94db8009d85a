"""Checks that a matrix holds integer counts, and exact recovery of counts from log1p values."""

from __future__ import annotations

import numpy as np


def _values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix, as a flat array."""
    import scipy.sparse as sp

    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def _check_counts(X, what: str) -> None:
    """Raise ``ValueError`` unless every value of ``X`` is a finite, non-negative integer."""
    v = _values(X)
    if v.size == 0:
        return
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what}: expected integer counts, found non-finite values.")
    if v.min() < 0:
        raise ValueError(f"{what}: expected integer counts, found negative values ({v.min()}).")
    frac = np.abs(v - np.rint(v))
    if frac.max() > 0:
        raise ValueError(
            f"{what}: expected integer counts, found {int((frac > 0).sum())} non-integral "
            f"values (largest distance to an integer {frac.max():.3g}); is this log-normalised?"
        )


def _counts_from_lognorm(
    lognorm,
    totals=None,
    *,
    target_sum: float = 1e4,
    atol_log: float = 1e-4,
    what: str = "data",
):
    """Recover integer counts exactly from ``log1p(counts / totals * target_sum)`` values.

    Each stored value ``x`` of cell ``i`` is inverted as
    ``c = round(expm1(x) * totals[i] / target_sum)``, and the inversion is accepted only if it
    is exact up to the precision of the stored values: ``|x - log1p(c * target_sum /
    totals[i])| <= atol_log`` for every entry, and the neighbouring integers ``c - 1`` and
    ``c + 1`` are farther than ``atol_log`` from ``x`` (so the rounding is unambiguous).

    Parameters
    ----------
    lognorm
        Cells x genes matrix (sparse or dense) of ``log1p`` normalised values.
    totals
        Per-cell library sizes used by the normalisation. ``None``: infer them, assuming the
        smallest non-zero count of each cell is 1, 2, ... (the first multiple that makes every
        entry of the cell integral is kept).
    target_sum
        The normalisation target (``normalize_total(target_sum=...)``).
    atol_log
        Tolerance in log space: half the quantum of the stored values (``5e-4`` for values
        stored with three decimals) plus a margin for float32 rounding.
    what
        Name of the data set, for error messages.

    Returns
    -------
    scipy.sparse.csr_matrix
        Integer counts stored as float32, same shape and sparsity pattern as ``lognorm``.

    Raises
    ------
    ValueError
        If some entry is not integral within ``atol_log`` (or its rounding is ambiguous).
    """
    import scipy.sparse as sp

    L = sp.csr_matrix(lognorm, dtype=np.float32, copy=True)
    L.sort_indices()
    x = L.data.astype(np.float64)
    if x.size and x.min() < 0:
        raise ValueError(f"{what}: log1p values must be non-negative.")
    rows = np.repeat(np.arange(L.shape[0]), np.diff(L.indptr))
    e = np.expm1(x)

    def check(x, e, scale):
        c = np.rint(e * scale)
        pos = np.maximum(c, 1.0)
        err = np.abs(x - np.log1p(c / scale))
        gap = np.minimum(np.log1p((pos + 1) / scale) - x, x - np.log1p((pos - 1) / scale))
        ok = (c >= 1) & (err <= atol_log) & (gap > atol_log)
        return c, ok, err

    if totals is not None:
        s = np.asarray(totals, dtype=np.float64).ravel() / target_sum
        if s.shape[0] != L.shape[0] or not np.all(s > 0):
            raise ValueError(f"{what}: need one positive total per cell.")
        c, ok, err = check(x, e, s[rows])
    else:
        # smallest non-zero value of each cell corresponds to its smallest count
        nz = np.diff(L.indptr) > 0
        mins = np.full(L.shape[0], np.inf)
        np.minimum.at(mins, rows, e)
        base = np.where(nz, 1.0 / np.where(nz, mins, 1.0), 1.0)
        c = np.zeros_like(x)
        ok = np.zeros(x.shape, bool)
        err = np.full(x.shape, np.inf)
        todo = np.ones(L.shape[0], bool)
        for k in range(1, 11):
            sel = todo[rows]
            ck, okk, errk = check(x[sel], e[sel], (k * base)[rows][sel])
            c[sel], ok[sel], err[sel] = ck, okk, errk
            cell_ok = np.ones(L.shape[0], bool)
            np.logical_and.at(cell_ok, rows, ok)
            todo = ~cell_ok
            if not todo.any():
                break
    if not ok.all():
        bad = ~ok
        raise ValueError(
            f"{what}: counts could not be recovered exactly from the log-normalised values: "
            f"{int(bad.sum())} of {x.size} entries in {np.unique(rows[bad]).size} cells are not "
            f"integral within {atol_log:g} in log space (largest error {err[bad].max():.3g}). "
            "The normalisation is not log1p(counts / total * target_sum) with these totals."
        )
    return sp.csr_matrix((c.astype(np.float32), L.indices.copy(), L.indptr.copy()), shape=L.shape)

"""Log-normalised expression: the one scale every metric compares cells on.

``log1p`` of counts scaled to ``target_sum`` (10,000) per cell, as a dense float64 array, so
that a metric never depends on how its inputs were stored (sparse or dense, float32 or
integer counts).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def lognorm(x, target_sum: float = 1e4) -> np.ndarray:
    """``log1p(x / rowsum(x) * target_sum)`` as a dense float64 array; AnnData reads ``X``.

    Parameters
    ----------
    x
        Counts, cells x genes: a numpy array, a scipy sparse matrix or an AnnData.
    target_sum
        Counts per cell after scaling. A cell without counts stays all zeros.

    Raises
    ------
    ValueError
        An empty or non-2-D matrix, or counts that are NaN or negative.
    """
    if hasattr(x, "X") and hasattr(x, "obs"):
        x = x.X
    x = x.toarray() if sparse.issparse(x) else np.asarray(x, dtype=np.float64)
    x = x.astype(np.float64, copy=False)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected a non-empty cells x genes matrix, got shape {x.shape}.")
    if np.isnan(x).any() or (x < 0).any():
        raise ValueError("Counts must be finite and non-negative to log-normalise.")
    lib = x.sum(1, keepdims=True)
    return np.log1p(x / np.maximum(lib, 1e-12) * target_sum)


def lognormalize(x, target_sum: float = 1e4) -> np.ndarray:
    """Deprecated name of :func:`lognorm` (kept for one release)."""
    import warnings

    warnings.warn(
        "sfa.metrics.lognormalize is deprecated; use sfa.metrics.lognorm (the same maths).",
        DeprecationWarning,
        stacklevel=2,
    )
    return lognorm(x, target_sum)

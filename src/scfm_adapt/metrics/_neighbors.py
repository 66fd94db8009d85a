"""Agreement between the neighbourhoods of two embeddings of the same cells."""

from __future__ import annotations

import numpy as np


def _knn(x: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    idx = nn.kneighbors(x, return_distance=False)
    return idx[:, 1:]  # drop the cell itself


def neighbor_agreement(a: np.ndarray, b: np.ndarray, n_neighbors: int = 15) -> float:
    """Mean fraction of each cell's ``n_neighbors`` nearest neighbours (Euclidean) in
    embedding ``a`` that are also among its nearest neighbours in ``b``.

    1 when the two embeddings have the same neighbourhoods; about ``n_neighbors / n_cells``
    for unrelated ones. Use it to ask how much of each single modality's structure a joint
    embedding keeps.

    Parameters
    ----------
    a, b
        ``(n_cells, dims)`` embeddings of the same cells, in the same order.
    n_neighbors
        Neighbourhood size (needs ``n_cells > n_neighbors``).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must be (n_cells, dims) embeddings of the same cells; got {a.shape} "
            f"and {b.shape}."
        )
    if not 0 < n_neighbors < a.shape[0]:
        raise ValueError(f"n_neighbors={n_neighbors} needs 0 < n_neighbors < {a.shape[0]} cells.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("The embeddings contain NaN or infinite values.")
    ia, ib = _knn(a, n_neighbors), _knn(b, n_neighbors)
    shared = [len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(ia, ib)]
    return float(np.mean(shared) / n_neighbors)

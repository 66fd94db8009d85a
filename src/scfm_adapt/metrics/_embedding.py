"""Metrics of cell embeddings: kNN label transfer, batch mixing, neighbourhood agreement.

Every function takes embeddings as ``(n_cells, dims)`` arrays and labels as arrays, so any
model's (or baseline's) embedding is scored the same way. Neighbours are Euclidean.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _knn_classifier(x_ref: np.ndarray, y_ref: np.ndarray, k: int, weights: str):
    """sklearn's ``KNeighborsClassifier(k, weights=weights)`` fit on the reference cells."""
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=k, weights=weights).fit(x_ref, y_ref)


def knn_transfer(
    x_ref: np.ndarray,
    y_ref: np.ndarray,
    x_query: np.ndarray,
    y_query: np.ndarray,
    k: int = 15,
) -> dict[str, float]:
    """Label transfer by a k-nearest-neighbour classifier from reference to query cells.

    A ``KNeighborsClassifier(k)`` (Euclidean, uniform weights) is fit on the reference
    embedding and labels (compared as strings) and scored on the query cells.

    Parameters
    ----------
    x_ref, y_ref
        Reference embedding ``(n_ref, d)`` and labels ``(n_ref,)``.
    x_query, y_query
        Query embedding ``(n_query, d)`` and its true labels ``(n_query,)``.
    k
        Number of neighbours.

    Returns
    -------
    ``{"accuracy": ..., "macro_f1": ...}`` on the query cells.
    """
    from sklearn.metrics import accuracy_score, f1_score

    y_ref, y_query = np.asarray(y_ref).astype(str), np.asarray(y_query).astype(str)
    pred = _knn_classifier(x_ref, y_ref, k, "uniform").predict(x_query)
    return {
        "accuracy": float(accuracy_score(y_query, pred)),
        "macro_f1": float(f1_score(y_query, pred, average="macro", zero_division=0)),
    }


def knn_transfer_proba(
    x_ref: np.ndarray,
    y_ref: np.ndarray,
    x_query: np.ndarray,
    k: int = 15,
    weights: str = "distance",
) -> tuple[np.ndarray, list[str]]:
    """Class probabilities of the query cells from their ``k`` nearest reference cells.

    ``KNeighborsClassifier(k, weights=weights)``: with ``"distance"`` each neighbour votes
    with weight ``1 / distance``, with ``"uniform"`` equally.

    Returns
    -------
    ``(proba, classes)``: ``(n_query, n_classes)`` probabilities, columns in the order of
    ``classes`` (the sorted reference labels, as strings).
    """
    knn = _knn_classifier(x_ref, y_ref, k, weights)
    return knn.predict_proba(x_query), [str(c) for c in knn.classes_]


def _normalized_entropy(counts: np.ndarray, n_max: int) -> np.ndarray:
    """Row-wise Shannon entropy of count vectors, divided by ``log(n_max)``."""
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h / math.log(n_max)


def batch_mixing_entropy(
    x: np.ndarray,
    batches: np.ndarray,
    groups: np.ndarray,
    k: int = 50,
) -> dict[str, Any]:
    """Within-group kNN entropy of batch labels (1 = perfectly mixed, 0 = unmixed).

    Definition. For each group ``g`` (a cell type) with cells ``S_g`` from ``B_g`` distinct
    batches (donors), and each cell ``i`` in ``S_g``: take its ``k_g = min(k, |S_g| - 1)``
    nearest other cells *of the same group* (Euclidean, in the embedding), let ``p_b`` be the
    fraction of them from batch ``b``, and score ``H_i = -sum_b p_b log p_b / log(min(B_g,
    k_g))``. A group's score is the mean of ``H_i`` over its cells; the reported score is the
    unweighted mean over groups. Groups with fewer than 2 batches (or ``k_g < 2``) are
    skipped. Restricting neighbours to the same group means differences in cell-type
    composition between batches are not counted as (lack of) mixing.

    The maximum 1 needs every batch equally present in every neighbourhood; when batches
    differ in size, even a perfectly mixed embedding scores below 1. ``reference`` gives
    the score of the batch composition itself (what random neighbours would get, up to
    sampling noise) as a yardstick. The score alone rewards erasing structure, so read it
    next to a conservation metric such as :func:`knn_transfer`.

    Parameters
    ----------
    x
        Embedding ``(n_cells, d)``.
    batches
        Batch (donor) label per cell.
    groups
        Group (cell type) label per cell.
    k
        Neighbours per cell.

    Returns
    -------
    ``{"score": float, "reference": float, "per_group": {group: score}, "k": k}``; the
    scores are NaN when no group qualifies.
    """
    from sklearn.neighbors import NearestNeighbors

    batches, groups = np.asarray(batches).astype(str), np.asarray(groups).astype(str)
    per_group: dict[str, float] = {}
    reference: list[float] = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        codes, inverse = np.unique(batches[idx], return_inverse=True)
        k_g = min(k, len(idx) - 1)
        if len(codes) < 2 or k_g < 2:
            continue
        n_max = min(len(codes), k_g)
        nn = NearestNeighbors(n_neighbors=k_g + 1).fit(x[idx])
        neigh = nn.kneighbors(x[idx], return_distance=False)[:, 1:]  # drop the cell itself
        counts = np.zeros((len(idx), len(codes)))
        np.add.at(counts, (np.repeat(np.arange(len(idx)), k_g), inverse[neigh].ravel()), 1.0)
        per_group[str(g)] = float(_normalized_entropy(counts, n_max).mean())
        composition = np.bincount(inverse, minlength=len(codes))[None, :].astype(float)
        reference.append(float(_normalized_entropy(composition, n_max)[0]))
    score = float(np.mean(list(per_group.values()))) if per_group else float("nan")
    ref = float(np.mean(reference)) if reference else float("nan")
    return {"score": score, "reference": ref, "per_group": per_group, "k": k}


def _neighbors(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of each cell's ``k`` nearest other cells."""
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
    ia, ib = _neighbors(a, n_neighbors), _neighbors(b, n_neighbors)
    shared = [len(np.intersect1d(x, y, assume_unique=True)) for x, y in zip(ia, ib)]
    return float(np.mean(shared) / n_neighbors)


def label_clustering(
    x: np.ndarray, labels, n_clusters: int | None = None, seed: int = 0
) -> dict[str, float]:
    """Whether cell types form the clusters a clustering finds (scIB's bio conservation
    figures that kNN accuracy hides: types can be locally separable yet not clustered).

    k-means (``n_clusters``: the number of labels by default, 10 restarts) on the embedding
    ``x``; returns its normalised mutual information and adjusted Rand index with
    ``labels``, and the labels' silhouette (Euclidean) rescaled to ``[0, 1]`` as scIB does
    (``(s + 1) / 2``; 1: tight, separated types).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be (n_cells, dims) with one label per cell; got {x.shape}.")
    k = n_clusters or len(np.unique(y))
    if not 2 <= k < len(y):
        raise ValueError(f"Clustering needs 2 <= n_clusters < n_cells; got {k} and {len(y)}.")
    clusters = KMeans(k, n_init=10, random_state=seed).fit_predict(x)
    return {
        "kmeans_nmi": float(normalized_mutual_info_score(y, clusters)),
        "kmeans_ari": float(adjusted_rand_score(y, clusters)),
        "silhouette_label": float((silhouette_score(x, y) + 1) / 2),
    }

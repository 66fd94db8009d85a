"""sfa.metrics of embeddings: kNN label transfer, batch mixing, neighbourhood agreement."""

from __future__ import annotations

import numpy as np
import pytest

import scfm_adapt as sfa

M = sfa.metrics


def test_knn_transfer_with_one_neighbour():
    x_ref, y_ref = np.array([[0.0], [10.0]]), np.array(["a", "b"])
    x_query, y_query = np.array([[1.0], [9.0], [6.0]]), np.array(["a", "b", "a"])
    # predicted a, b, b: 2 of 3 right; F1(a) = F1(b) = 2/3 (a: P 1, R 1/2; b: P 1/2, R 1)
    out = M.knn_transfer(x_ref, y_ref, x_query, y_query, k=1)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["macro_f1"] == pytest.approx(2 / 3)
    # labels are compared as strings
    assert M.knn_transfer(x_ref, [1, 2], x_query, ["1", "2", "1"], k=1) == out


def test_knn_transfer_proba_weights_by_inverse_distance():
    x_ref, y_ref = np.array([[0.0], [10.0]]), np.array(["b", "a"])
    proba, classes = M.knn_transfer_proba(x_ref, y_ref, np.array([[1.0]]), k=2)
    # weights 1/1 (label b) and 1/9 (label a): p(b) = 1 / (1 + 1/9) = 0.9
    assert classes == ["a", "b"]
    np.testing.assert_allclose(proba, [[0.1, 0.9]])
    uniform, _ = M.knn_transfer_proba(x_ref, y_ref, np.array([[1.0]]), k=2, weights="uniform")
    np.testing.assert_allclose(uniform, [[0.5, 0.5]])


def _clusters(batch_of_member, n_clusters: int = 6):
    """Clusters of 4 nearby cells, far apart; ``batch_of_member(cluster, member)``."""
    offsets = np.array([[0.0, 0.0], [0.01, 0.0], [0.0, 0.02], [0.03, 0.03]])
    x = np.concatenate([offsets + np.array([100.0 * c, 0.0]) for c in range(n_clusters)])
    batches = np.array([batch_of_member(c, m) for c in range(n_clusters) for m in range(4)])
    return x, batches, np.full(len(x), "t")


def test_batch_mixing_of_a_mixed_and_a_separated_embedding():
    # mixed: each cluster holds one cell of each of 4 batches; with k=3 a cell's neighbours
    # are the 3 others of its cluster, one from each other batch: H = log 3 / log 3 = 1
    x, batches, groups = _clusters(lambda c, m: f"b{m}")
    out = M.batch_mixing_entropy(x, batches, groups, k=3)
    assert out["score"] == pytest.approx(1.0)
    # reference: 4 equal batches, normalised by log(min(4, 3))
    assert out["reference"] == pytest.approx(np.log(4) / np.log(3))
    # separated: each cluster is one batch: every neighbourhood is a single batch
    x, batches, groups = _clusters(lambda c, m: f"b{c % 4}")
    assert M.batch_mixing_entropy(x, batches, groups, k=3)["score"] == pytest.approx(0.0)


def test_batch_mixing_skips_groups_with_one_batch():
    x, _, groups = _clusters(lambda c, m: "b0")
    out = M.batch_mixing_entropy(x, np.full(len(x), "b0"), groups, k=3)
    assert np.isnan(out["score"]) and out["per_group"] == {}


def test_neighbor_agreement_by_hand():
    a = np.array([[0.0], [1.0], [10.0], [11.0]])
    b = np.array([[0.0], [1.0], [10.0], [30.0]])
    # nearest neighbours in a: 0-1, 1-0, 2-3, 3-2; in b: 0-1, 1-0, 2-1, 3-2 -> 3 of 4 agree
    assert M.neighbor_agreement(a, b, n_neighbors=1) == pytest.approx(0.75)
    assert M.neighbor_agreement(a, a, n_neighbors=2) == 1.0
    with pytest.raises(ValueError, match="n_neighbors"):
        M.neighbor_agreement(a, b, n_neighbors=4)
    with pytest.raises(ValueError, match="same cells"):
        M.neighbor_agreement(a, b[:3])
    with pytest.raises(ValueError, match="NaN"):
        M.neighbor_agreement(a, np.where(b == 30.0, np.nan, b), n_neighbors=1)


def test_label_clustering_by_hand():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(10, 0.1, (20, 2))])
    y = ["a"] * 20 + ["b"] * 20
    out = M.label_clustering(x, y)
    assert out["kmeans_nmi"] == pytest.approx(1.0) and out["kmeans_ari"] == pytest.approx(1.0)
    assert out["silhouette_label"] > 0.99  # (s + 1) / 2 with s near 1
    shuffled = M.label_clustering(x, np.random.default_rng(1).permutation(y))
    assert shuffled["kmeans_ari"] < 0.2 and shuffled["silhouette_label"] < 0.55
    with pytest.raises(ValueError, match="n_clusters"):
        M.label_clustering(x, ["a"] * 40)

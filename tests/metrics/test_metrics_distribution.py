"""sfa.metrics of two sets of cells as distributions (generated vs real)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scfm_adapt as sfa
from conftest import make_adata
from scfm_adapt.metrics import _distribution as D

M = sfa.metrics


def _cells(n: int, scale: float = 1.0, seed: int = 0, genes: int = 30) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    mu = np.exp(np.random.default_rng(99).normal(size=genes)) * scale
    a = ad.AnnData(sparse.csr_matrix(rng.poisson(mu, (n, genes)).astype(np.float32)))
    a.var_names = [f"g{i}" for i in range(genes)]
    a.obs_names = [f"c{seed}_{i}" for i in range(n)]
    a.obs["cell_type"] = pd.Categorical(np.where(np.arange(n) % 2 == 0, "x", "y"))
    return a


def test_energy_of_two_one_dimensional_point_sets():
    a, b = np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]])
    # 2 E|a-b| - E|a-a'| - E|b-b'| = 2 * (1 + 3 + 1 + 1) / 4 - 1 - 1
    assert D.energy_embedded(a, b) == pytest.approx(1.0)
    assert D.energy_embedded(a, a) == 0.0
    # the reference-PCA energy of the perturbation metrics shares this core
    assert M.perturbation_energy_distance(a, b, reference=a) == pytest.approx(1.0)


def test_mmd_of_two_one_dimensional_point_sets():
    a = np.array([[0.0], [1.0]])
    # bandwidth 1: k(0, 1) = exp(-1/2); unbiased terms exp(-1/2) each, cross mean
    # (1 + 1 + 2 exp(-1/2)) / 4, so MMD^2 = 2 exp(-1/2) - (1 + exp(-1/2)) = exp(-1/2) - 1
    assert D.mmd_embedded(a, a.copy(), bandwidth=1.0) == pytest.approx(np.exp(-0.5) - 1)
    with pytest.raises(ValueError, match="at least 2"):
        D.mmd_embedded(a[:1], a, bandwidth=1.0)


def test_public_distances_are_the_point_set_ones_in_the_real_cells_pca():
    real, gen = _cells(80), _cells(60, scale=2.0, seed=1)
    a, b = M.embed_pair(real, gen, n_pcs=5)
    assert M.energy_distance(real, gen, n_pcs=5) == pytest.approx(D.energy_embedded(a, b))
    assert M.mmd(real, gen, n_pcs=5) == pytest.approx(D.mmd_embedded(a, b))
    assert M.energy_distance(real, real, n_pcs=5) == 0.0
    with pytest.raises(ValueError, match="different genes"):
        M.energy_distance(real, gen[:, ::-1].copy())
    with pytest.raises(ValueError, match="fit_on"):
        M.embed_pair(real, gen, fit_on="generated")


def test_gene_statistics_by_hand():
    real = np.array([[1.0, 0.0, 3.0], [1.0, 2.0, 1.0]])
    gen = real * 2  # the same proportions: identical log-normalised cells
    out = M.gene_statistics(real, gen)
    assert out["mean_pearson"] == pytest.approx(1.0)
    assert out["variance_pearson"] == pytest.approx(1.0)
    # zero fractions per gene (0, 0.5, 0) for both
    assert out["zero_fraction_pearson"] == pytest.approx(1.0)
    assert np.isnan(M.gene_statistics(real[:1], gen[:1])["variance_pearson"])  # all 0


def test_classifier_two_sample_test_separates_far_sets_and_checks_inputs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 3)), rng.normal(size=(40, 3)) + 100.0
    out = D.classifier_two_sample_test_embedded(a, b, n_neighbors=5)
    assert out == {"accuracy": 1.0, "auc": 1.0, "n_per_set": 40}
    with pytest.raises(ValueError, match="at least 10"):
        D.classifier_two_sample_test_embedded(a[:4], b)
    with pytest.raises(ValueError, match="classifier"):
        M.classifier_two_sample_test(_cells(40), _cells(40, seed=1), classifier="svm")


def test_evaluate_generation_rows_and_macro():
    real, gen = _cells(80), _cells(80, scale=1.5, seed=1)
    table = M.evaluate_generation(real, gen, groupby="cell_type", min_cells=20, n_pcs=5)
    assert list(table.index) == ["pooled", "x", "y", "macro"]
    assert table.loc["macro", "energy"] == pytest.approx(table.loc[["x", "y"], "energy"].mean())
    assert table.loc["pooled", "n_real"] == 80
    with pytest.raises(KeyError, match="tissue"):
        M.evaluate_generation(real, gen, groupby="tissue")


def test_evaluate_generation_of_a_few_cells_gives_nan_where_a_metric_needs_more():
    real = _cells(60)
    few = M.evaluate_generation(real, _cells(4, seed=1), n_pcs=5).loc["pooled"]
    assert few[["precision", "recall", "density", "coverage", "c2st_knn_auc"]].isna().all()
    assert np.isfinite(few[["mmd", "energy", "wasserstein", "mean_pearson"]]).all()
    assert few["n_generated"] == 4
    enough = M.evaluate_generation(real, _cells(12, seed=1), n_pcs=5).loc["pooled"]
    assert np.isfinite(enough[["precision", "coverage", "c2st_knn_auc"]].astype(float)).all()


# --------------------------------------------------------------------------- metrics
def _pair(shift: float = 0.0, n: int = 300, seed: int = 0):
    """Two disjoint halves of one synthetic data set; ``shift`` distorts the second."""
    full = make_adata(2 * n, 30, seed=seed)
    a, b = full[:n].copy(), full[n:].copy()
    if shift:
        x = b.X.toarray()
        x[:, :10] = np.round(x[:, :10] * (1 + shift) + 3 * shift)
        b.X = sparse.csr_matrix(x)
    return a, b


def test_metrics_are_zero_for_identical_sets_and_grow_with_a_shift():
    a, _ = _pair()
    _, b_same = _pair(0.0)
    _, b_far = _pair(5.0)
    m = sfa.metrics
    assert abs(m.mmd(a, a)) < 1e-2 and abs(m.energy_distance(a, a)) < 1e-6
    assert m.mmd(a, b_far) > m.mmd(a, b_same) + 0.05
    assert m.energy_distance(a, b_far) > 2 * m.energy_distance(a, b_same)
    same = m.classifier_two_sample_test(a, b_same)
    far = m.classifier_two_sample_test(a, b_far)
    assert 0.4 < same["accuracy"] < 0.6 and 0.4 < same["auc"] < 0.6
    assert far["accuracy"] > 0.9 and far["auc"] > 0.95
    assert m.classifier_two_sample_test(a, b_far, classifier="logistic")["auc"] > 0.95
    stats = m.gene_statistics(a, a)
    assert all(v == pytest.approx(1.0) for v in stats.values())
    assert m.gene_statistics(a, b_far)["mean_pearson"] < stats["mean_pearson"]


def test_evaluate_generation_pooled_and_per_group():
    a, b = _pair(0.0)
    table = sfa.metrics.evaluate_generation(a, b, groupby="cell_type", min_cells=20)
    assert {"pooled", "macro", "type0", "type1", "type2"} <= set(table.index)
    assert {"mmd", "c2st_knn_accuracy", "zero_fraction_pearson"} <= set(table.columns)
    assert table.loc["macro", "mmd"] == pytest.approx(
        table.loc[["type0", "type1", "type2"], "mmd"].mean()
    )


def test_metric_inputs_are_checked():
    a, b = _pair()
    with pytest.raises(ValueError, match="different genes"):
        sfa.metrics.mmd(a, b[:, ::-1].copy())
    with pytest.raises(ValueError, match="classifier"):
        sfa.metrics.classifier_two_sample_test(a, b, classifier="svm")
    with pytest.raises(KeyError, match="obs"):
        sfa.metrics.evaluate_generation(a, b, groupby="tissue")
    arrays = sfa.metrics.mmd(a.X.toarray(), b.X.toarray())
    assert arrays == pytest.approx(sfa.metrics.mmd(a, b))


# ------------------------------------------------------------------ fidelity and diversity
def test_precision_recall_density_coverage_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1: every real ball has radius 1
    gen = np.array([[0.5], [10.0]])  # in the balls of 0 and 1; far from everything
    out = M.precision_recall_embedded(real, gen, k=1)
    assert out["precision"] == pytest.approx(0.5)  # 1 of 2 generated points is realistic
    assert out["density"] == pytest.approx((2 + 0) / (1 * 2))  # 2 balls hold it, k=1
    assert out["coverage"] == pytest.approx(0.5)  # the balls of 0 and 1 hold one
    assert out["recall"] == pytest.approx(1.0)  # generated balls: radius 9.5 around 0.5
    same = M.precision_recall_embedded(real, real, k=1)
    assert [same[m] for m in ("precision", "recall", "coverage")] == [1.0, 1.0, 1.0]
    # each point lies in its own ball and its neighbours' (edges count): 2 + 3 + 3 + 2 balls
    assert same["density"] == pytest.approx((2 + 3 + 3 + 2) / (1 * 4))
    with pytest.raises(ValueError, match="more than k"):
        M.precision_recall_embedded(real, gen, k=2)


def test_wasserstein_by_hand():
    a, b = np.array([[0.0], [1.0]]), np.array([[3.0], [1.0]])
    # the best matching pairs 0 with 1 and 1 with 3: squared distances 1 and 4
    assert M.wasserstein_embedded(a, b) == pytest.approx(np.sqrt(2.5))
    assert M.wasserstein_embedded(a, a) == 0.0
    x = np.random.default_rng(0).normal(size=(50, 3))
    assert M.wasserstein_embedded(x, x + 2.0) == pytest.approx(np.sqrt(12.0))  # a shift


def test_label_fidelity_by_hand():
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(10, 0.1, (20, 2))])
    labels = ["A"] * 20 + ["B"] * 20
    gen = np.array([[0.0, 0.0]] * 4 + [[10.0, 10.0]] * 2 + [[10.0, 10.0]] * 3)
    asked = ["A"] * 6 + ["B"] * 3  # two "A" cells came out looking like B
    out = M.label_fidelity_embedded(real, labels, gen, asked)
    assert out["A"] == pytest.approx(4 / 6) and out["B"] == pytest.approx(1.0)
    assert out["all"] == pytest.approx(7 / 9)
    with pytest.raises(ValueError, match="two labels"):
        M.label_fidelity_embedded(real, ["A"] * 40, gen, asked)


def test_evaluate_generation_reports_fidelity_and_diversity():
    real, _ = _pair()
    real.obs["t"] = np.where(np.arange(real.n_obs) % 2, "x", "y")
    table = M.evaluate_generation(real, real.copy(), groupby="t", min_cells=10)
    pooled = table.loc["pooled"]
    assert pooled["wasserstein"] == pytest.approx(0.0, abs=1e-9)
    assert pooled["precision"] == pooled["recall"] == pooled["coverage"] == 1.0
    assert {"label_fidelity", "density"} <= set(table.columns)
    assert 0.0 <= pooled["label_fidelity"] <= 1.0
    assert set(table.index) >= {"pooled", "x", "y", "macro"}

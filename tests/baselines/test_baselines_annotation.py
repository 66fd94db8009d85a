"""sfa.baselines of cell-type annotation and embedding, on small synthetic data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scfm_adapt as sfa

B = sfa.baselines


def _labelled(n: int = 60, genes: int = 12, seed: int = 0, batch: str = "b1") -> ad.AnnData:
    """Two cell types: type "t1" expresses genes 0-3 ten times higher."""
    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n) % 2 == 0, "t1", "t2")
    mu = np.full((n, genes), 5.0)
    mu[labels == "t1", :4] = 50.0
    a = ad.AnnData(sparse.csr_matrix(rng.poisson(mu).astype(np.float32)))
    a.var_names = [f"g{i}" for i in range(genes)]
    a.obs_names = [f"{seed}_{i}" for i in range(n)]
    a.obs["cell_type"] = pd.Categorical(labels)
    a.obs["batch"] = pd.Categorical([batch] * n)
    return a


def test_logreg_hvg_separates_two_types():
    train, test = _labelled(), _labelled(seed=1)
    r = B.logreg_hvg(train, test, "cell_type")
    assert r.method == "logreg_hvg" and r.classes == ["t1", "t2"]
    np.testing.assert_allclose(r.proba.sum(1), 1.0)
    pred = np.asarray(r.classes)[r.proba.argmax(1)]
    assert (pred == test.obs["cell_type"].to_numpy()).all()
    # two classes: one coefficient per gene plus one intercept
    assert r.trainable_params == 12 + 1
    assert r.notes.startswith("12 genes")
    assert B.logreg_hvg(train, test, "cell_type", genes=["g0", "g5"]).trainable_params == 3


def test_knn_pca_parameters_and_probabilities():
    train, test = _labelled(), _labelled(seed=1)
    r = B.knn_pca(train, test, "cell_type", n_pcs=3, k=5)
    assert r.classes == ["t1", "t2"] and r.proba.shape == (test.n_obs, 2)
    # 3 components of 12 genes plus the 12-gene mean
    assert r.trainable_params == 3 * 12 + 12
    assert sfa.metrics.classification_metrics(test.obs["cell_type"], r.proba, r.classes)[
        "accuracy"
    ] == pytest.approx(1.0)
    # the number of PCs is capped by the genes
    assert B.knn_pca(train, test, "cell_type", genes=["g0", "g1", "g5"]).notes.startswith(
        "3 genes, 2 PCs"
    )


def test_highly_variable_genes_and_embeddings():
    a = _labelled(genes=30)
    assert B.highly_variable_genes(a, n_top_genes=30) == list(a.var_names)
    top = B.highly_variable_genes(a, n_top_genes=5)
    assert len(top) == 5 and top == [g for g in a.var_names if g in top]  # var order
    x = B.lognorm_genes(a)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, sfa.metrics.lognorm(a), rtol=1e-6)
    fit = np.arange(a.n_obs) < 40
    emb = B.pca_embedding(a, fit_mask=fit, n_comps=4, n_top_genes=10)
    assert emb.shape == (a.n_obs, 4) and emb.dtype == np.float32
    # the PCA is centred on the fitted cells
    np.testing.assert_allclose(emb[fit].mean(0), 0.0, atol=1e-4)
    # capped by the cells it is fitted on
    assert B.pca_embedding(a, fit_mask=np.arange(a.n_obs) < 3, n_comps=50).shape[1] == 2


def test_scvi_baselines_share_one_reference(monkeypatch):
    pytest.importorskip("scvi")
    from scfm_adapt.baselines import _annotation

    # tiny budgets: a few epochs each, enough to check the plumbing
    monkeypatch.setattr(_annotation, "SCVI_BUDGET", 120)
    monkeypatch.setattr(_annotation, "QUERY_BUDGET", 60)
    monkeypatch.setattr(_annotation, "SCANVI_BUDGET", 60)
    train, test = _labelled(), _labelled(seed=1, batch="b2")  # an unseen test batch
    ref = B.scvi_reference(train, test, "cell_type", "batch", seed=0)
    knn = B.scvi_knn(train, test, "cell_type", "batch", reference=ref)
    assert knn.classes == ["t1", "t2"] and knn.proba.shape == (test.n_obs, 2)
    assert "scArches query" in knn.notes and knn.wall_s >= ref.seconds
    soft = B.scanvi(train, test, "cell_type", "batch", reference=ref)
    np.testing.assert_allclose(soft.proba.sum(1), 1.0, rtol=1e-5)
    assert soft.classes == ["t1", "t2"] and soft.trainable_params > 0

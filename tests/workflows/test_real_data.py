"""SCFM on real cells (Kang 2018 control PBMC, 8 donors). Skips when the data is absent."""

import numpy as np
import pandas as pd
import pytest

import scfm_adapt as sfa

pytestmark = [pytest.mark.data, pytest.mark.slow]


def test_kang_ctrl_embedding_transfers_cell_types_across_donors(shared_data):
    import scipy.stats as st
    from sklearn.neighbors import KNeighborsClassifier

    adata = sfa.datasets.kang2018_ctrl(path=shared_data)
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 3000, replace=False))].copy()
    sfa.model.SCFM.setup_anndata(adata, batch_key="sample_id")
    model = sfa.model.SCFM(adata)
    model.train(
        max_epochs=15,
        max_epochs_prior=2,
        train_size=0.8,
        validation_size=0.1,
        enable_progress_bar=False,
    )

    donors = adata.obs["sample_id"].astype(str).to_numpy()
    labels = adata.obs["cluster_id"].astype(str).to_numpy()
    test = np.isin(donors, sorted(set(donors))[-2:])
    z = model.get_latent_representation()
    acc = (
        KNeighborsClassifier(15).fit(z[~test], labels[~test]).predict(z[test]) == labels[test]
    ).mean()
    majority = (labels[test] == pd.Series(labels[~test]).mode()[0]).mean()
    assert acc > 0.85 and acc > majority + 0.3

    # Held-out likelihood beats the training-mean baseline (each gene's mean fraction
    # times the cell's library size, Poisson).
    test_idx = np.asarray(model.test_indices)
    train_idx = np.asarray(model.train_indices)
    X = adata.X.toarray()
    frac = X[train_idx].sum(0) / X[train_idx].sum()
    lib = X[test_idx].sum(1, keepdims=True)
    baseline = -st.poisson.logpmf(X[test_idx], np.maximum(lib * frac, 1e-8)).sum(1).mean()
    nll = model.get_reconstruction_error(indices=test_idx)["reconstruction_loss"]
    assert nll < baseline

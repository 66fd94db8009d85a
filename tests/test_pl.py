"""sfa.pl: figures returned, files written on request, inputs untouched, clear errors."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest

import scfm_adapt as sfa

matplotlib.use("Agg")


def test_history_plots_each_stage_and_saves(trained, tmp_path):
    path = tmp_path / "hist.png"
    fig = sfa.pl.history(trained, save=path, show=False)
    assert len(fig.axes) == 2 and path.stat().st_size > 0
    assert [ax.get_title() for ax in fig.axes] == ["vae stage", "prior stage"]
    vae_line = fig.axes[0].get_lines()[0].get_ydata()
    expected = trained.history["vae"]["elbo_train"].to_numpy(dtype=float).ravel()
    np.testing.assert_allclose(vae_line, expected)
    with pytest.raises(ValueError, match="metrics"):
        sfa.pl.history(trained, metric="nope", show=False)
    with pytest.raises(ValueError, match="not trained"):
        sfa.pl.history(trained, stages=["finetune"], show=False)


def test_history_of_an_untrained_model_fails_clearly(adata, tiny_kwargs):
    sfa.model.SCFM.setup_anndata(adata)
    with pytest.raises(ValueError, match="train it first"):
        sfa.pl.history(sfa.model.SCFM(adata, **tiny_kwargs), show=False)


def test_embedding_umap_leaves_adata_unchanged(adata, tmp_path):
    adata.obsm["X_scfm"] = np.random.default_rng(0).normal(size=(adata.n_obs, 4))
    before = (set(adata.obsm), set(adata.uns), set(adata.obsp), list(adata.obs.columns))
    fig = sfa.pl.embedding(adata, ["cell_type", "gene1"], save=tmp_path / "u.png", show=False)
    assert len([a for a in fig.axes if a.get_title()]) == 2
    assert (tmp_path / "u.png").stat().st_size > 0
    assert before == (set(adata.obsm), set(adata.uns), set(adata.obsp), list(adata.obs.columns))
    with pytest.raises(KeyError, match=r"sfa\.tl\.embed"):
        sfa.pl.embedding(adata, "cell_type", basis="X_missing", show=False)
    with pytest.raises(KeyError, match="neither obs columns nor genes"):
        sfa.pl.embedding(adata, "no_such_key", show=False)


def test_calibration_reports_the_expected_calibration_error(tmp_path):
    rng = np.random.default_rng(0)
    n = 4000
    conf = rng.uniform(0.2, 1.0, n)
    right = rng.uniform(size=n) < conf  # calibrated by construction
    truth = np.where(right, "a", "b")
    obs = pd.DataFrame({"truth": truth, "scfm_label": "a", "scfm_label_confidence": conf})
    good = ad.AnnData(obs=obs.set_index(pd.Index([f"c{i}" for i in range(n)])))
    fig = sfa.pl.calibration(good, "truth", save=tmp_path / "cal.pdf", show=False)
    assert fig.ece_ < 0.05 and (tmp_path / "cal.pdf").stat().st_size > 0
    over = good.copy()
    over.obs["scfm_label_confidence"] = 0.99  # always sure, right ~60% of the time
    ece = sfa.pl.calibration(over, "truth", show=False).ece_
    assert ece == pytest.approx(0.99 - right.mean(), abs=1e-9)
    with pytest.raises(KeyError, match=r"sfa\.tl\.annotate"):
        sfa.pl.calibration(good, "cell_type", show=False)


def test_perturbation_delta_scatter_with_intervals():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(50)]
    obs_delta = pd.Series(rng.normal(size=50), index=genes)
    pred_delta = obs_delta + rng.normal(scale=0.3, size=50)
    pred = ad.AnnData(np.zeros((2, 50)), var=pd.DataFrame(index=genes))
    pred.varm["scfm_delta"] = pd.DataFrame({"IFNB": pred_delta}, index=genes)
    pred.varm["scfm_delta_lower"] = pd.DataFrame({"IFNB": pred_delta - 0.5}, index=genes)
    pred.varm["scfm_delta_upper"] = pd.DataFrame({"IFNB": pred_delta + 0.5}, index=genes)
    fig = sfa.pl.perturbation_delta(pred, obs_delta, show=False)
    assert fig.pearson_r_ == pytest.approx(np.corrcoef(obs_delta, pred_delta)[0, 1])
    assert "IFNB" in fig.axes[0].get_title()
    sub = sfa.pl.perturbation_delta(pred, obs_delta, genes=genes[:10], show=False)
    assert sub.axes[0].collections[-1].get_offsets().shape == (10, 2)
    with pytest.raises(KeyError, match="not a predicted request"):
        sfa.pl.perturbation_delta(pred, obs_delta, label="TNF", show=False)
    with pytest.raises(KeyError, match="scfm_delta"):
        sfa.pl.perturbation_delta(ad.AnnData(np.zeros((2, 3))), obs_delta, show=False)

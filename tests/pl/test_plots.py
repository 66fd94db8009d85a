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


def _pred_with_intervals():
    genes = [f"g{i}" for i in range(30)]
    delta = pd.DataFrame(0.0, index=genes, columns=["A", "B", "A+B"])
    delta.loc["g3", "A"] = 2.0  # the strongest responders, by construction
    delta.loc["g7", "B"] = -1.5
    delta.loc["g11", "A+B"] = 1.0
    pred = ad.AnnData(np.zeros((3, 30)), var=pd.DataFrame(index=genes))
    pred.varm["scfm_delta"] = delta
    pred.varm["scfm_delta_lower"] = delta - 0.1
    pred.varm["scfm_delta_upper"] = delta + 0.1
    return pred


def test_perturbation_heatmap_picks_top_genes_and_marks_sure_changes(tmp_path):
    pred = _pred_with_intervals()
    varm_before = pred.varm["scfm_delta"].copy()
    fig = sfa.pl.perturbation_heatmap(pred, n_genes=3, save=tmp_path / "h.svg", show=False)
    assert fig.genes_ == ["g3", "g7", "g11"]
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(image[0], [2.0, 0.0, 0.0])
    marks = fig.axes[0].collections[0].get_offsets()  # only the three non-zero cells
    assert sorted(map(tuple, np.asarray(marks))) == [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)]
    assert (tmp_path / "h.svg").stat().st_size > 0
    pd.testing.assert_frame_equal(pred.varm["scfm_delta"], varm_before)
    only_b = sfa.pl.perturbation_heatmap(pred, n_genes=1, labels=["B"], show=False)
    assert only_b.genes_ == ["g7"]
    with pytest.raises(KeyError, match="were not predicted"):
        sfa.pl.perturbation_heatmap(pred, labels=["C"], show=False)
    with pytest.raises(KeyError, match="not in the prediction"):
        sfa.pl.perturbation_heatmap(pred, genes=["nope"], show=False)


def test_generated_vs_real_overlays_both_sets_without_changing_them(tmp_path):
    rng = np.random.default_rng(0)
    real = ad.AnnData(
        rng.poisson(3, size=(80, 20)).astype(np.float32),
        obs=pd.DataFrame({"cell_type": ["a", "b"] * 40}, index=[f"r{i}" for i in range(80)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(20)]),
    )
    gen = real[:30].copy()
    gen.obs_names = [f"x{i}" for i in range(30)]
    fig = sfa.pl.generated_vs_real(
        real, gen, color="cell_type", n_pcs=5, save=tmp_path / "gv.png", show=False
    )
    titled = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in titled] == ["source", "cell_type"]
    assert titled[0].collections[0].get_offsets().shape == (110, 2)  # every cell drawn
    assert "X_umap" not in real.obsm and "neighbors" not in real.uns
    assert (tmp_path / "gv.png").stat().st_size > 0
    with pytest.raises(ValueError, match="different genes"):
        sfa.pl.generated_vs_real(real, gen[:, :10], show=False)
    with pytest.raises(KeyError, match="obs column of both"):
        sfa.pl.generated_vs_real(real, gen, color="batch", show=False)


def test_adaptation_plot_places_strategies_and_baselines():
    table = pd.DataFrame(
        {"accuracy": [0.952, 0.951, 0.953, 0.953], "trainable_params": [10304, 4104, 30784, 7e5]},
        index=["logreg_hvg", "linear_probe", "lora", "full"],
    )
    fig = sfa.pl.adaptation(table, baselines=["logreg_hvg"], show=False)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    points = np.vstack([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(points, table[["trainable_params", "accuracy"]].to_numpy())
    assert [t.get_text() for t in ax.texts] == list(table.index)
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [0.952]  # the baseline line
    with pytest.raises(KeyError, match="no column 'f1'"):
        sfa.pl.adaptation(table, metric="f1", show=False)
    with pytest.raises(KeyError, match="not rows"):
        sfa.pl.adaptation(table, baselines=["scvi"], show=False)

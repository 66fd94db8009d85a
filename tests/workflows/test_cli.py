"""The quickstart main job, at a tiny budget."""

import json

import pytest

from scfm_adapt.cli import knn_cv_accuracy, main


@pytest.mark.slow
def test_quickstart_writes_report_h5ad_umap_and_model(tmp_path):
    import anndata as ad

    out = tmp_path / "qs"
    assert (
        main(
            [
                "quickstart",
                "--out",
                str(out),
                "--max-epochs",
                "2",
                "--max-epochs-prior",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["knn_accuracy_5fold"]["mean"] <= 1
    assert len(report["knn_accuracy_5fold"]["folds"]) == 5
    assert report["heldout_reconstruction_nll"]["value"] > 0
    assert report["heldout_reconstruction_nll"]["n_cells"] == 70
    assert report["training_time_s"]["total"] > 0
    assert (out / "umap_scfm.png").stat().st_size > 10_000
    a = ad.read_h5ad(out / "pbmc68k_scfm.h5ad")
    assert (out / "model" / "model.safetensors").exists()
    # The default latent, 8 tokens x 16 dims, joined (pooling="concat").
    assert a.obsm["X_scfm"].shape == (700, 8 * 16) and "X_umap" in a.obsm


def test_knn_cv_accuracy_separates_separable_from_random():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 50)
    separable = rng.normal(size=(150, 5)) + 10 * (
        labels[:, None] == np.array(["a", "b", "c", "a", "b"])
    )
    assert np.mean(knn_cv_accuracy(separable, labels)) > 0.95
    assert np.mean(knn_cv_accuracy(rng.normal(size=(150, 5)), labels)) < 0.6

"""The label-efficiency benchmark's draws (benchmarks/label_efficiency.py): k labelled cells
per type from the pool, every cell of a type that has fewer, the whole pool for "all"."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, load_benchmark, make_adata


def test_draws_take_k_cells_per_type_and_differ_by_seed(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its helpers (_common, ...)
    le = load_benchmark("label_efficiency")
    pool = make_adata(n_cells=90, seed=0)
    pool = pool[~((pool.obs["cell_type"] == "type2").to_numpy() & (np.arange(90) > 20))].copy()
    counts = pool.obs["cell_type"].value_counts()
    five = le.draw(pool, "cell_type", "5", 0)
    got = five.obs["cell_type"].value_counts()
    for t, n in counts.items():
        assert got[t] == min(5, n)
    assert set(five.obs_names) <= set(pool.obs_names)
    other = le.draw(pool, "cell_type", "5", 1)
    assert list(other.obs_names) != list(five.obs_names)
    assert list(le.draw(pool, "cell_type", "5", 0).obs_names) == list(five.obs_names)
    assert le.draw(pool, "cell_type", "all", 3).n_obs == pool.n_obs


def test_the_scarches_rows_map_a_query_and_predict_its_labels(monkeypatch, tmp_path):
    """The scArches rows on a tiny reference file laid out as pbmc_reference.py writes it
    (one batch per file, the Kang types elsewhere "Unknown"): the query (lacking one of
    the reference's genes, padded with zeros) is mapped as a new batch, and SCANVI with few
    labels, kNN on the mapped latent and the reference SCANVI each give probabilities over
    the right classes for every evaluation cell."""
    pytest.importorskip("scvi")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import _scarches

    for name in ("REFERENCE_EPOCHS", "QUERY_EPOCHS", "SCANVI_EPOCHS"):
        monkeypatch.setattr(_scarches, name, 2)
    ref = make_adata(n_cells=120, n_genes=30, seed=0)
    ref.obs["dataset"] = np.where(np.arange(120) < 60, "kang_ctrl", "citeseq")
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str)
    ref.obs.loc[ref.obs["dataset"] == "citeseq", "cell_type"] = "Unknown"
    ref.write_h5ad(tmp_path / "data.h5ad")
    scvi_ref, scanvi_ref = _scarches.reference(tmp_path)
    query = make_adata(n_cells=60, n_genes=30, seed=1)[:, 1:].copy()  # lacks gene 0
    query.obs_names = [f"q{i}" for i in range(60)]
    mapped = _scarches.map_query(query, scvi_ref)
    assert mapped.adata.n_vars == 30 and list(mapped.adata.var_names) == list(ref.var_names)
    assert mapped.adata[:, "gene0"].X.sum() == 0  # padded
    labelled, evaluation = query.obs_names[:20], query.obs_names[20:]
    y = query.obs["cell_type"][:20].astype(str)
    for proba, classes in (
        _scarches.few_labels(mapped, labelled, y, evaluation, 0),
        _scarches.latent_knn(mapped, labelled, y, evaluation),
    ):
        assert proba.shape == (40, len(set(y))) and set(classes) == set(y)
        np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    proba, classes = _scarches.zero_shot(query[20:], scanvi_ref)
    known = set(ref.obs.loc[ref.obs["dataset"] == "kang_ctrl", "cell_type"].astype(str))
    assert proba.shape == (40, len(known)) and set(classes) == known


def test_the_scfm_query_rows_use_the_querys_cells_without_labels(monkeypatch, tiny_saved):
    """``scfm_ref_knn``'s embedding: the query's cells (no labels, 80% of the genes) mapped
    onto the reference as a new batch, one embedding row per cell, then the shared kNN;
    ``scfm_scratch_lora``'s backbone trained on the query alone."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    le = load_benchmark("label_efficiency")
    import _scarches

    monkeypatch.setattr(le, "QUERY_EPOCHS", 1)
    reference, _ = tiny_saved
    query = make_adata(n_cells=40, seed=3)[:, 8:].copy()
    query.obs_names = [f"q{i}" for i in range(40)]
    z, names = le.scfm_query_embedding(query, reference)
    assert z.shape[0] == 40 and list(names) == list(query.obs_names)
    assert np.isfinite(z).all() and z.std(0).max() > 0
    y = query.obs["cell_type"][:15].astype(str)
    proba, classes = _scarches.embedding_knn(z, names, names[:15], y, names[15:], k=5)
    assert proba.shape == (25, len(set(y))) and set(classes) == set(y)
    # scfm_scratch_lora's backbone: the query's cells alone, without their labels
    monkeypatch.setattr(le, "SCRATCH_EPOCHS", 1)
    scratch = le.scratch_model(query)
    assert scratch.is_trained_ and scratch.var_names_ == list(query.var_names)
    assert scratch.registry_["setup_args"].get("labels_key") is None

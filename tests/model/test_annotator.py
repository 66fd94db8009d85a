"""CellAnnotator: training, calibration, OOD flagging, tl.annotate, save/load, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scfm_adapt as sfa
from scfm_adapt.errors import GeneMismatchError

FAST = {"enable_progress_bar": False, "batch_size": 32}


@pytest.fixture
def pretrained(tiny_kwargs):
    from conftest import make_adata

    ad = make_adata(n_cells=240, seed=1)
    sfa.model.SCFM.setup_anndata(ad, batch_key="batch")
    model = sfa.model.SCFM(ad, **tiny_kwargs)
    model.train(max_epochs=5, stage="vae", early_stopping=False, **FAST)
    return model


def labelled(part: int = 0, n: int = 240, drop_type=None):
    """Cells ``part * n ... (part + 1) * n`` of one synthetic tissue (same gene programs)."""
    from conftest import make_adata

    ad = make_adata(n_cells=4 * n, seed=2)[part * n : (part + 1) * n].copy()
    if drop_type is not None:
        ad = ad[ad.obs["cell_type"] != drop_type].copy()
        ad.obs["cell_type"] = ad.obs["cell_type"].cat.remove_unused_categories()
    return ad


@pytest.mark.parametrize("strategy", ["linear_probe", "lora"])
def test_annotator_learns_and_calibrates(pretrained, strategy):
    train, test = labelled(0), labelled(1)
    before = {k: v.clone() for k, v in pretrained.module.state_dict().items()}
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(train, pretrained=pretrained, strategy=strategy)
    ann.train(max_epochs=30, lr=1e-2, **FAST)
    hist = ann.history_["elbo_train"].to_numpy().ravel()
    assert hist[-1] < 0.5 * hist[0]
    probs = ann.predict(test, soft=True)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    y = test.obs["cell_type"].astype(str).to_numpy()
    acc = (probs.idxmax(axis=1).to_numpy() == y).mean()
    assert acc > 0.8, acc  # 3 balanced types: chance is 1/3
    assert 0.05 <= ann.calibration_["temperature"] <= 20
    # the pretrained model is untouched: the annotator adapted a copy
    after = pretrained.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rep = ann.parameter_report()
    assert rep["trainable"] == rep["head"] + rep["adapter"]
    assert (rep["adapter"] == 0) == (strategy == "linear_probe")


def test_unlabelled_cells_are_not_fitted(pretrained):
    train = labelled()
    train.obs["cell_type"] = train.obs["cell_type"].astype(str)
    train.obs.loc[train.obs_names[::2], "cell_type"] = "Unknown"
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(train, pretrained=pretrained, strategy="linear_probe")
    assert sorted(ann.classes_) == ["type0", "type1", "type2"]  # "Unknown" is no class
    ann.train(max_epochs=5, lr=1e-2, **FAST)
    assert set(ann.predict(train)) <= {"type0", "type1", "type2", "Unknown"}


def test_unknown_type_is_flagged(pretrained):
    train = labelled(0, n=300, drop_type="type2")
    test = labelled(1, n=300)
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(train, pretrained=pretrained, strategy="linear_probe")
    ann.train(max_epochs=30, lr=1e-2, **FAST)
    table, _ = ann.predict_details(test)
    novel = (test.obs["cell_type"] == "type2").to_numpy()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(novel, table["ood_score"]) > 0.8  # the score ranks novel cells high
    assert table["is_ood"][novel].mean() > 3 * table["is_ood"][~novel].mean()
    assert table["is_ood"][~novel].mean() < 0.15
    assert (table["label"][table["is_ood"]] == "Unknown").all()
    # a confidence floor flags more cells, never fewer
    strict, _ = ann.predict_details(test, min_confidence=0.999)
    assert strict["is_ood"].sum() >= table["is_ood"].sum()


def test_transfer_labels_to_a_query_with_other_genes_flags_a_new_type(pretrained):
    """One call from a reference annotator to a query holding 70% of its genes (plus
    genes it never saw): labels, confidences and "Unknown" in obs; a type the reference
    never had is marked Unknown more often than the known ones; the annotator's own mask
    is restored after the call."""
    train = labelled(0, n=300, drop_type="type2")
    test = labelled(1, n=300)
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(train, pretrained=pretrained, strategy="linear_probe")
    ann.train(max_epochs=30, lr=1e-2, **FAST)
    query = test[:, [f"gene{j}" for j in range(12, 40)]].copy()  # 28 of 40 genes
    query.var_names = [*query.var_names[:-2], "novel0", "novel1"]
    truth = query.obs.pop("cell_type").to_numpy()
    threshold = ann.calibration_["ood_threshold"]
    sfa.tl.transfer_labels(query, ann)
    labels = query.obs["scfm_label"].astype(str).to_numpy()
    assert list(query.obs_names) == list(test.obs_names)
    assert set(labels) <= {"type0", "type1", "Unknown"}
    assert query.uns["scfm_label"]["gene_overlap"]["n_shared"] == 26
    novel = truth == "type2"
    unknown = labels == "Unknown"
    assert unknown[novel].mean() > 2 * unknown[~novel].mean()
    known = ~novel & ~unknown
    assert (labels[known] == truth[known]).mean() > 0.8
    assert bool(ann.module.backbone.gene_mask.all())  # the annotator is unchanged
    assert ann.calibration_["ood_threshold"] == threshold
    assert float(ann.module.ood_threshold) == pytest.approx(threshold)
    with pytest.raises(sfa.errors.TooFewGenesError):
        sfa.tl.transfer_labels(test[:, :10].copy(), ann)


def test_few_labels_on_a_query_with_fewer_genes_mask_the_missing_ones(pretrained, tmp_path):
    """An annotator adapted on a query aligned to the reference genes reads the genes the
    query lacks as unobserved: its mask is the query's panel (kept by a save) and their
    counts do not change a prediction."""
    from scfm_adapt.data import align_genes

    q = labelled(0, n=120)[:, [f"gene{j}" for j in range(16, 40)]].copy()
    q = align_genes(q, pretrained.var_names_)
    sfa.model.CellAnnotator.setup_anndata(q, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(q, pretrained=pretrained, strategy="lora")
    ann.train(max_epochs=3, lr=1e-2, **FAST)
    mask = ann.module.backbone.gene_mask
    assert mask.tolist() == [False] * 16 + [True] * 24
    assert bool(pretrained.module.gene_mask.all())  # the reference is untouched
    probs = ann.predict(q, soft=True).to_numpy()
    noisy = q.copy()
    noisy.X = noisy.X.toarray()
    noisy.X[:, :16] = 9.0
    np.testing.assert_allclose(ann.predict(noisy, soft=True).to_numpy(), probs, atol=1e-5)
    ann.save(tmp_path / "ann")
    assert sfa.model.CellAnnotator.load(tmp_path / "ann").module.backbone.gene_mask.equal(mask)


def test_annotate_writes_slots_and_round_trips(pretrained, tmp_path):
    train, test = labelled(0), labelled(1, n=50)
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(train, pretrained=pretrained, strategy="adapter")
    ann.train(max_epochs=5, lr=1e-2, **FAST)
    del test.obs["cell_type"]  # labels are not needed to annotate
    sfa.tl.annotate(test, ann)
    assert test.obs["scfm_label"].dtype == "category"
    assert set(test.obs["scfm_label"].cat.categories) == {"type0", "type1", "type2", "Unknown"}
    conf = test.obs["scfm_label_confidence"].to_numpy()
    probs = test.obsm["scfm_label_probs"]
    assert probs.shape == (50, 3) and list(probs.columns) == ann.classes_
    np.testing.assert_allclose(conf, probs.to_numpy().max(1), rtol=1e-6)
    assert test.uns["scfm_label"]["params"]["strategy"] == "adapter"

    ann.save(tmp_path / "ann")
    loaded = sfa.model.CellAnnotator.load(tmp_path / "ann")
    np.testing.assert_allclose(
        loaded.predict(test, soft=True).to_numpy(), probs.to_numpy(), rtol=1e-5, atol=1e-6
    )
    t1, _ = ann.predict_details(test)
    t2, _ = loaded.predict_details(test)
    np.testing.assert_allclose(t1["ood_score"], t2["ood_score"], rtol=1e-4)
    assert "temperature" in repr(loaded)


def test_errors(pretrained):
    train = labelled()
    with pytest.raises(KeyError, match="not a column"):
        sfa.model.CellAnnotator.setup_anndata(train, labels_key="celltype")
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    with pytest.raises(ValueError, match="Unknown strategy"):
        sfa.model.CellAnnotator(train, pretrained=pretrained, strategy="prefix")
    bad = labelled()[:, :30].copy()
    sfa.model.CellAnnotator.setup_anndata(bad, labels_key="cell_type")
    with pytest.raises(GeneMismatchError, match="align_genes"):
        sfa.model.CellAnnotator(bad, pretrained=pretrained)
    ann = sfa.model.CellAnnotator(train, pretrained=pretrained, strategy="linear_probe")
    ann.train(max_epochs=1, **FAST)
    with pytest.raises(GeneMismatchError):
        ann.predict(bad)


@pytest.mark.slow
def test_annotation_on_real_data(shared_data):
    """Kang 2018 controls: pretrain on 4 donors, annotate 2 unseen donors."""
    from sklearn.metrics import accuracy_score

    ad = sfa.datasets.kang2018_ctrl(path=shared_data / "kang2018_ctrl_8donors.h5ad")
    donors = sorted(ad.obs["sample_id"].unique())
    rng = np.random.default_rng(0)
    train = ad[ad.obs["sample_id"].isin(donors[:4])]
    train = train[rng.choice(train.n_obs, 1500, replace=False)].copy()
    test = ad[ad.obs["sample_id"].isin(donors[-2:])]
    test = test[rng.choice(test.n_obs, 600, replace=False)].copy()
    sfa.model.SCFM.setup_anndata(train, batch_key="sample_id")
    model = sfa.model.SCFM(train)
    model.train(max_epochs=10, stage="vae", early_stopping=False, **FAST)
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cluster_id")
    ann = sfa.model.CellAnnotator(train, pretrained=model, strategy="lora")
    ann.train(max_epochs=10, lr=3e-3, **FAST)
    sfa.tl.annotate(test, ann)
    y = test.obs["cluster_id"].astype(str)
    best = test.obsm["scfm_label_probs"].idxmax(axis=1)
    assert accuracy_score(y, best) > 0.85
    assert test.obs["scfm_label_is_ood"].mean() < 0.1


def test_annotator_lora_reaches_both_factors_of_a_factorised_gene_map():
    from scfm_adapt.model._annotator import _annotator_targets
    from scfm_adapt.nn import TokenEncoder

    sizes = dict(n_tokens=8, token_dim=4, hidden=16, depth=1, n_heads=2)
    low = _annotator_targets(TokenEncoder(400, rank=32, **sizes))
    assert {"gene_down", "gene_to_tokens", "attn.qkv"} <= set(low)
    full = _annotator_targets(TokenEncoder(400, rank=None, **sizes))
    assert "gene_to_tokens" in full and "gene_down" not in full

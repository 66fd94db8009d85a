"""SCFM with pathway, rank and graph-masked tokenizers: training, round trips, errors and
pathway attributions of the three models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scfm_adapt as sfa
from scfm_adapt.data import (
    OTHER_GENES,
)
from scfm_adapt.errors import GeneMismatchError, SCFMInputError
from scfm_adapt.nn import (
    graph_mask,
)

FAST = {"enable_progress_bar": False, "early_stopping": False, "batch_size": 32}


def toy_sets(n_genes: int = 40) -> dict[str, list[str]]:
    """Six overlapping sets of 12 genes; genes 35-39 are in none."""
    return {f"S{i}": [f"gene{j}" for j in range(i * 5, min(i * 5 + 12, 35))] for i in range(6)}


def chain(n: int) -> list[tuple[str, str]]:
    return [(f"gene{i}", f"gene{i + 1}") for i in range(n - 1)]


# ---------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def pathway_model():
    from conftest import TINY, make_adata

    a = make_adata(n_cells=240, seed=1)
    sfa.model.SCFM.setup_anndata(a, batch_key="batch")
    m = sfa.model.SCFM(
        a,
        tokenizer="pathway",
        gene_sets=toy_sets(),
        gene_graph=chain(40),
        tokenizer_kwargs={"min_size": 5, "sparse_threshold": 1.0},  # neighbour lists
        **TINY,
    )
    m.train(max_epochs=8, stage="vae", **FAST)
    return m, a


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tokenizer": "pathway", "gene_sets": toy_sets(), "tokenizer_kwargs": {"min_size": 5}},
        {"tokenizer": "rank", "tokenizer_kwargs": {"top_k": 12}},
        {"tokenizer": "rank", "gene_graph": chain(40), "tokenizer_kwargs": {"top_k": 12}},
    ],
    ids=["pathway", "rank", "rank+graph"],
)
def test_tokenizer_models_train_and_round_trip(kwargs, tiny_kwargs, tmp_path):
    from conftest import make_adata

    a = make_adata()
    sfa.model.SCFM.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    m = sfa.model.SCFM(a, **kwargs, **tiny_kwargs)
    assert m.module.tokenizer == kwargs["tokenizer"]
    m.train(max_epochs=6, **FAST)
    elbo = m.history["vae"]["elbo_train"].to_numpy().ravel()
    assert elbo[-1] < elbo[0]
    z = m.get_latent_representation()
    width = tiny_kwargs["n_tokens"] * tiny_kwargs["token_dim"]  # the tokens joined
    assert z.shape == (a.n_obs, width) and np.isfinite(z).all()
    path = m.save(tmp_path / "m")
    back = sfa.model.SCFM.load(path, adata=a)
    np.testing.assert_array_equal(back.get_latent_representation(), z)
    enc, enc2 = m.module.encoder, back.module.encoder
    for name, buf in enc.named_buffers():
        torch.testing.assert_close(buf, dict(enc2.named_buffers())[name])
    if kwargs["tokenizer"] == "rank":
        assert not torch.all(enc.gene_median == 1)  # fitted on the data


def test_tokenizer_arguments_get_clear_errors(adata, tiny_kwargs):
    sfa.model.SCFM.setup_anndata(adata)
    with pytest.raises(SCFMInputError, match="tokenizer='pathway'"):
        sfa.model.SCFM(adata, gene_sets=toy_sets(), **tiny_kwargs)
    with pytest.raises(SCFMInputError, match="do not apply"):
        sfa.model.SCFM(adata, tokenizer="rank", tokenizer_kwargs={"max_sets": 3}, **tiny_kwargs)
    with pytest.raises(SCFMInputError, match="choose one of"):
        sfa.model.SCFM(adata, tokenizer="words", **tiny_kwargs)
    with pytest.raises(SCFMInputError, match="backbone="):
        sfa.model.SCFM(adata, tokenizer="geneformer", **tiny_kwargs)
    with pytest.raises(GeneMismatchError, match="No gene set"):
        sfa.model.SCFM(adata, tokenizer="pathway", gene_sets={"x": ["A", "B"]}, **tiny_kwargs)
    latent = sfa.model.SCFM(adata, **tiny_kwargs)
    with pytest.raises(SCFMInputError, match="tokenizer='pathway'"):
        latent.get_pathway_attributions()


def test_pathway_graph_runs_sparse_and_masks(pathway_model):
    m, a = pathway_model
    enc = m.module.encoder
    names = m.pathway_names_
    assert names[-1] == OTHER_GENES and len(names) == enc.n_sets
    attn_mask, neighbors = enc.graph()
    assert attn_mask is None and neighbors is not None  # sparse_threshold=1: neighbour lists
    dense = graph_mask(enc.edges, enc.n_sets)
    h = enc.token_inputs(m.module.normalize(torch.as_tensor(a.X[:5].toarray()))[0])
    w = enc.blocks[0].attn.attention_weights(enc.blocks[0].norm1(h), attn_mask, neighbors)
    assert torch.all(w[:, :, ~dense] == 0)
    # the catch-all set (genes 35-39) is linked by the chain edge 34-35 to the sets holding 34
    assert dense[-1, :-1].any()


def test_pathway_attributions_sum_to_the_change_from_baseline(pathway_model):
    m, _ = pathway_model
    df = m.get_pathway_attributions(indices=np.arange(20), n_steps=64)
    assert df.shape == (20, len(m.pathway_names_))
    assert list(df.columns) == m.pathway_names_
    gap = np.abs(df.attrs["completeness_gap"])
    assert np.all(gap <= 0.02 * np.abs(df.sum(1)).to_numpy() + 1e-3)
    assert (df.sum(1) > 0).all()  # squared distance from the baseline: positive
    assert np.isfinite(df.to_numpy()).all() and (df.abs().sum(0) > 0).all()


def test_annotator_pathway_attributions(pathway_model):
    from conftest import make_adata

    m, _ = pathway_model
    train = make_adata(n_cells=240, seed=1)
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(train, pretrained=m, strategy="lora")
    ann.train(max_epochs=15, lr=1e-2, enable_progress_bar=False, batch_size=32)
    df = ann.get_pathway_attributions(indices=np.arange(30), n_steps=48)
    logits, _, _ = ann._outputs(ann.adata, np.arange(30))
    m_ = ann.module
    x0 = m_.backbone.encoder
    with torch.no_grad():
        ref = m_.backbone.reference_input()
        base = x0.features_from_inputs(x0.token_inputs(ref))
        base_logits = m_.head(base.flatten(1))[0]
    chosen = logits.argmax(1)
    change = (logits.gather(1, chosen[:, None])[:, 0] - base_logits[chosen]).numpy()
    np.testing.assert_allclose(df.sum(1).to_numpy(), change, rtol=0.05, atol=0.02)
    assert list(df.attrs["label"]) == list(np.asarray(ann.classes_)[chosen.numpy()])
    one = ann.get_pathway_attributions(indices=[0, 1], label=ann.classes_[0], n_steps=8)
    assert set(one.attrs["label"]) == {ann.classes_[0]}
    with pytest.raises(ValueError, match="not one of"):
        ann.get_pathway_attributions(label="nope")


def test_perturbation_pathway_attributions():
    from conftest import make_perturbation_adata, toy_features

    a = make_perturbation_adata(n_per_group=30, n_genes=30)
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    sets = {f"P{i}": [f"g{j}" for j in range(i * 6, i * 6 + 6)] for i in range(5)}
    pm = sfa.model.PerturbationModel(
        a,
        gene_features=toy_features(),
        n_ensemble=2,
        hidden=32,
        n_tokens=4,
        token_dim=4,
        encoder_hidden=16,
        encoder_depth=1,
        n_heads=2,
        gene_likelihood="poisson",
        tokenizer="pathway",
        gene_sets=sets,
        tokenizer_kwargs={"min_size": 3},
        anchor=None,  # the heads' decoded response, which differs from cell to cell
    )
    pm.train(max_epochs=10, head_steps=60, progress=False, calibration_cells=32)
    ctrl = a[(a.obs["condition"] == "control").to_numpy()].copy()
    df = pm.get_pathway_attributions(ctrl, "A", n_top_genes=5, n_steps=32)
    assert df.shape == (ctrl.n_obs, 5) and len(df.attrs["genes"]) == 5
    assert np.isfinite(df.to_numpy()).all()
    gap = np.abs(df.attrs["completeness_gap"])
    assert np.median(gap) <= 0.05 * np.median(np.abs(df.sum(1))) + 1e-4
    with pytest.raises(SCFMInputError, match="not the model's genes"):
        pm.get_pathway_attributions(ctrl, "A", genes=["nope"])


def test_distilled_student_keeps_the_tokenizer_data(pathway_model):
    m, _ = pathway_model
    student = sfa.model.distill(
        m,
        max_epochs=1,
        encoder_hidden=8,
        encoder_depth=1,
        decoder_hidden=16,
        batch_size=32,
        enable_progress_bar=False,
    )
    t_enc, s_enc = m.module.encoder, student.module.encoder
    assert student.module.tokenizer == "pathway" and s_enc.hidden == 8
    for name in ("member_set", "member_gene", "edges"):
        assert torch.equal(getattr(t_enc, name), getattr(s_enc, name))

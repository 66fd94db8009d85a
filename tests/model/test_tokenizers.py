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
        # neighbour lists; one catch-all token (the tests below name it); a single gene
        # edge links two sets
        tokenizer_kwargs={
            "min_size": 5,
            "sparse_threshold": 1.0,
            "n_residual": 1,
            "min_edge_share": 0.0,
        },
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
    if kwargs["tokenizer"] == "pathway":  # new models give each set its own input map
        assert enc.per_set_inputs and enc2.per_set_inputs
        cov = back.pathway_coverage_
        catch = np.array([sfa.data.is_catch_all(n) for n in m.pathway_names_])
        assert cov == m.pathway_coverage_ and cov["n_sets"] == (~catch).sum()
        assert cov["n_catch_all"] == catch.sum() == 5  # genes 35-39: one programme each
        assert cov["genes_in_sets"] + cov["catch_all_genes"] == a.n_vars
        assert cov["variance_in_sets"] + cov["catch_all_variance"] == pytest.approx(1.0)
        # the shares are those of the genes' own variances
        x = a.X.toarray()
        v = np.log1p(x / x.sum(1, keepdims=True) * 1e4).var(0)
        members = enc.member_gene[~torch.as_tensor(catch)[enc.member_set]]
        named = np.unique(members.numpy())
        assert cov["variance_in_sets"] == pytest.approx(v[named].sum() / v.sum())


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


def test_tl_pathway_attributions_and_their_plot(pathway_model, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    m, a = pathway_model
    cells = a[:40].copy()
    sfa.tl.pathway_attributions(cells, m, groupby="cell_type", n_top=3, n_steps=32)
    attr = cells.obsm["scfm_pathways"]
    direct = m.get_pathway_attributions(cells, n_steps=32)
    np.testing.assert_allclose(attr, direct.to_numpy(), rtol=1e-5, atol=1e-6)
    entry = cells.uns["scfm_pathways"]
    assert entry["names"] == m.pathway_names_ and entry["params"]["groupby"] == "cell_type"
    np.testing.assert_allclose(
        cells.obs["scfm_pathways_gap"], direct.attrs["completeness_gap"], atol=1e-6
    )
    top = entry["top"]
    assert set(top["group"]) == set(cells.obs["cell_type"].astype(str))
    assert (top.groupby("group")["rank"].max() == 3).all()
    # each group's first pathway has its largest mean |attribution|, and shares are parts
    for group, t in top.groupby("group"):
        rows = (cells.obs["cell_type"].astype(str) == group).to_numpy()
        mean_abs = np.abs(attr[rows]).mean(0)
        first = t.sort_values("rank").iloc[0]
        assert first["pathway"] == m.pathway_names_[int(mean_abs.argmax())]
        assert first["share"] == pytest.approx(mean_abs.max() / mean_abs.sum(), rel=1e-5)
    import anndata as ad

    cells.write_h5ad(tmp_path / "cells.h5ad")  # the slots survive a round trip to disk
    back = ad.read_h5ad(tmp_path / "cells.h5ad")
    np.testing.assert_array_equal(back.obsm["scfm_pathways"], attr)
    assert back.uns["scfm_pathways"]["top"].equals(top)
    fig = sfa.pl.pathway_attributions(cells, n_top=2, save=tmp_path / "p.png", show=False)
    assert (tmp_path / "p.png").stat().st_size > 0 and len(fig.axes) == top["group"].nunique()
    with pytest.raises(KeyError, match="groupby="):
        sfa.pl.pathway_attributions(a)
    with pytest.raises(KeyError, match="no attributions"):
        sfa.pl.pathway_attributions(cells, groups=["nope"])
    with pytest.raises(KeyError, match="not a column"):
        sfa.tl.pathway_attributions(cells, m, groupby="nope")


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


def test_annotator_trains_the_gene_to_pathway_weights_in_its_copy(pathway_model, tmp_path):
    from conftest import make_adata

    m, _ = pathway_model
    pre = {n: getattr(m.module.encoder, n).detach().clone() for n in ("member_weight", "set_in")}
    train = make_adata(n_cells=240, seed=1)
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(train, pretrained=m, strategy="lora")
    enc = ann.module.backbone.encoder
    assert enc.member_weight.requires_grad and enc.set_in.requires_grad
    rep = ann.parameter_report()
    own = enc.member_weight.numel() + enc.set_in.numel()
    lora = sum(p.numel() for n, p in enc.named_parameters() if "lora_" in n)
    assert rep["adapter"] == own + lora
    ann.train(max_epochs=3, lr=1e-2, enable_progress_bar=False, batch_size=32)
    assert not torch.equal(enc.member_weight.detach(), pre["member_weight"])
    for name, value in pre.items():  # the pretrained model is not touched
        assert torch.equal(getattr(m.module.encoder, name).detach(), value)
    back = sfa.model.CellAnnotator.load(ann.save(tmp_path / "ann"), adata=train)
    torch.testing.assert_close(back.module.backbone.encoder.member_weight, enc.member_weight)
    assert list(back.predict(train)) == list(ann.predict(train))
    # they belong to the adapter: saved with it, parked when it is switched off
    bb = ann.module.backbone
    name = bb.active_adapter
    tuned = enc.member_weight.detach().clone()
    assert torch.equal(bb.adapter_tensors(name)["encoder.member_weight"], tuned)
    bb.set_adapter(None)
    assert torch.equal(enc.member_weight.detach(), pre["member_weight"])
    bb.set_adapter(name)
    assert torch.equal(enc.member_weight.detach(), tuned) and enc.member_weight.requires_grad
    bottleneck = sfa.model.CellAnnotator(train, pretrained=m, strategy="adapter")
    assert bottleneck.module.backbone.encoder.set_in.requires_grad
    # a linear probe reads the pretrained tokens as they are
    probe = sfa.model.CellAnnotator(train, pretrained=m, strategy="linear_probe")
    assert not probe.module.backbone.encoder.member_weight.requires_grad


def test_member_weights_start_from_the_sets_principal_axes(tiny_kwargs):
    from conftest import make_adata

    a = make_adata(n_cells=120, seed=2)
    sfa.model.SCFM.setup_anndata(a)
    kw = {"min_size": 5, "n_residual": 1}
    m = sfa.model.SCFM(
        a,
        tokenizer="pathway",
        gene_sets=toy_sets(),
        tokenizer_kwargs={**kw, "member_init": "pca"},
        **tiny_kwargs,
    )
    enc = m.module.encoder
    w = enc.member_weight.detach().numpy()
    si, gi = enc.member_set.numpy(), enc.member_gene.numpy()
    x = a.X.toarray()
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    for p in range(enc.n_sets):
        rows = si == p
        np.testing.assert_allclose(w[rows, 0], rows.sum() ** -0.5, rtol=1e-6)
        sub = x[:, gi[rows]] - x[:, gi[rows]].mean(0)
        top = np.linalg.eigh(sub.T @ sub)[1][:, -1]  # the set's first principal axis
        assert abs(np.dot(top, w[rows, 1])) == pytest.approx(1.0, abs=1e-4)
    assert m.module.hparams_["tokenizer_options"]["member_init"] == "pca"
    with pytest.raises(SCFMInputError, match="member_init"):
        sfa.model.SCFM(
            a,
            tokenizer="pathway",
            gene_sets=toy_sets(),
            tokenizer_kwargs={**kw, "member_init": "svd"},
            **tiny_kwargs,
        )


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
    # the Scanpy-style tool passes the request through and writes the same numbers
    sfa.tl.pathway_attributions(ctrl, pm, groupby="context", perturbation="A", n_top_genes=5)
    np.testing.assert_allclose(ctrl.obsm["scfm_pathways"], df.to_numpy(), rtol=1e-5, atol=1e-6)
    params = ctrl.uns["scfm_pathways"]["params"]
    assert params["perturbation"] == "A" and params["model"] == "PerturbationModel"


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


def test_catch_all_split_into_programmes(tiny_kwargs):
    from conftest import make_adata

    a = make_adata(n_cells=120, seed=2)
    sfa.model.SCFM.setup_anndata(a)
    kw = {"min_size": 5, "n_residual": 2}
    m = sfa.model.SCFM(
        a, tokenizer="pathway", gene_sets=toy_sets(), tokenizer_kwargs=kw, **tiny_kwargs
    )
    names = m.pathway_names_
    catch = [n for n in names if sfa.data.is_catch_all(n)]
    assert len(catch) == 2 and names[-2:] == catch
    cov = m.pathway_coverage_
    assert cov["n_catch_all"] == 2 and cov["n_sets"] == len(names) - 2
    enc = m.module.encoder
    in_catch = np.isin(enc.member_set.numpy(), [len(names) - 2, len(names) - 1])
    assert sorted(enc.member_gene.numpy()[in_catch]) == list(range(35, 40))  # genes in no set


def test_gene_scores_choose_sets_first_and_the_graph_density_is_reported(tiny_kwargs):
    from conftest import make_adata

    a = make_adata(n_cells=120, seed=3)
    sfa.model.SCFM.setup_anndata(a)
    a.var["score"] = 0.0
    a.var.loc[[f"gene{j}" for j in range(25, 35)], "score"] = 1.0  # S5's genes
    kw = {"min_size": 5, "max_sets": 2, "n_residual": 1}

    def build(**extra):
        opts = {**kw, **extra.pop("tokenizer_kwargs", {})}
        return sfa.model.SCFM(
            a,
            tokenizer="pathway",
            gene_sets=toy_sets(),
            tokenizer_kwargs=opts,
            **extra,
            **tiny_kwargs,
        )

    plain = build().pathway_names_[:2]
    assert "S5" not in plain  # the coverage pass alone prefers the larger sets
    ranked = build(tokenizer_kwargs={"gene_scores": "score", "n_ranked": 1})
    assert ranked.pathway_names_[0] == "S5" and len(ranked.pathway_names_) == 3
    as_array = build(tokenizer_kwargs={"gene_scores": a.var["score"].to_numpy(), "n_ranked": 1})
    assert as_array.pathway_names_ == ranked.pathway_names_
    with pytest.raises(SCFMInputError, match="not a column of adata"):
        build(tokenizer_kwargs={"gene_scores": "nope", "n_ranked": 1})
    with pytest.raises(SCFMInputError, match="one finite"):
        build(tokenizer_kwargs={"gene_scores": [1.0, 2.0], "n_ranked": 1})
    # the pathway graph's density is reported, and a share threshold thins it
    dense = build(gene_graph=chain(40), tokenizer_kwargs={"max_sets": 6, "min_edge_share": 0})
    sparse_ = build(gene_graph=chain(40), tokenizer_kwargs={"max_sets": 6})  # default 0.1
    d0, d1 = (m.pathway_coverage_["graph_density"] for m in (dense, sparse_))
    n = len(dense.pathway_names_)
    enc = dense.module.encoder
    assert d0 == pytest.approx(sfa.data.graph_density(enc.edges.numpy(), n))
    assert dense.pathway_coverage_["graph_edges"] == enc.edges.shape[0]
    assert 0 < d1 < d0 <= 1


def test_perturbation_pathway_backbone_ranks_sets_by_the_response():
    from conftest import make_perturbation_adata
    from scfm_adapt.model._perturbation import response_scores

    a = make_perturbation_adata(n_per_group=30, n_genes=30)
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    scores = response_scores(a, sfa.model.PerturbationModel(a, gene_features=None).setup_)
    # A, B and C multiply g0-14 by 4; the others move only through the library size
    assert scores.shape == (30,) and scores[:15].mean() > scores[15:].mean() + 0.1
    # alphabetical order favours the sets of genes that do not respond
    sets = {
        "Z_resp": [f"g{j}" for j in range(6)],
        "A_null": [f"g{j}" for j in range(20, 26)],
        "N_own": [f"g{j}" for j in range(24, 30)],
    }
    kw = {
        "gene_features": None,
        "n_ensemble": 2,
        "tokenizer": "pathway",
        "gene_sets": sets,
        "n_tokens": 4,
        "token_dim": 4,
        "encoder_hidden": 16,
        "encoder_depth": 1,
        "n_heads": 2,
    }
    pm = sfa.model.PerturbationModel(a, **kw, tokenizer_kwargs={"min_size": 3, "max_sets": 1})
    assert pm.backbone.pathway_names_[0] == "Z_resp"
    off = sfa.model.PerturbationModel(
        a, **kw, tokenizer_kwargs={"min_size": 3, "max_sets": 1, "n_ranked": 0}
    )
    assert off.backbone.pathway_names_[0] == "A_null"
    # the caller's scores replace the response, still for the first 16 sets
    own = np.zeros(30)
    own[26:30] = 1.0
    given = sfa.model.PerturbationModel(
        a, **kw, tokenizer_kwargs={"min_size": 3, "max_sets": 1, "gene_scores": own}
    )
    assert given.backbone.pathway_names_[0] == "N_own"

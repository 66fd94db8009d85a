"""Pathway and rank tokenizers, graph-masked attention, pathway attributions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import scfm_adapt as sfa
from scfm_adapt.data import (
    OTHER_GENES,
    as_gene_graph,
    memberships,
    read_gmt,
    select_gene_sets,
    set_graph,
)
from scfm_adapt.errors import GeneMismatchError, SCFMInputError
from scfm_adapt.nn import (
    Attention,
    PathwayTokenEncoder,
    RankTokenEncoder,
    TransformerBlock,
    graph_mask,
    graph_neighbors,
    integrated_gradients,
)

FAST = {"enable_progress_bar": False, "early_stopping": False, "batch_size": 32}


def toy_sets(n_genes: int = 40) -> dict[str, list[str]]:
    """Six overlapping sets of 12 genes; genes 35-39 are in none."""
    return {f"S{i}": [f"gene{j}" for j in range(i * 5, min(i * 5 + 12, 35))] for i in range(6)}


def chain(n: int) -> list[tuple[str, str]]:
    return [(f"gene{i}", f"gene{i + 1}") for i in range(n - 1)]


# ---------------------------------------------------------------------- gene sets, graphs
def test_select_gene_sets_filters_and_is_deterministic():
    genes = [f"g{i}" for i in range(100)]
    sets = {
        "big": genes[:60],
        "dup": genes[:58],  # overlaps 'big' almost entirely: skipped once 'big' is chosen
        "mid": genes[50:80],
        "small": genes[:3],  # under min_size
        "alien": ["X1", "X2", "X3"] * 5,
    }
    out = select_gene_sets(sets, genes, min_size=5, max_size=100, max_sets=2)
    assert list(out) == ["big", "mid"]
    np.testing.assert_array_equal(out["mid"], np.arange(50, 80))
    again = select_gene_sets(dict(reversed(list(sets.items()))), genes, 5, 100, 2)
    assert list(again) == list(out)
    with pytest.raises(GeneMismatchError, match="identifiers"):
        select_gene_sets({"a": ["X"] * 20}, genes)


def test_memberships_add_a_catch_all_set():
    sel = {"a": np.array([0, 1]), "b": np.array([1, 2])}
    names, si, gi = memberships(sel, 5)
    assert names == ["a", "b", OTHER_GENES]
    np.testing.assert_array_equal(gi[si == 2], [3, 4])
    names, si, _ = memberships(sel, 3)
    assert names == ["a", "b"] and si.max() == 1


def test_read_gmt(tmp_path):
    f = tmp_path / "sets.gmt"
    f.write_text("A\tdesc\tg1\tg2\nB\t\tg3\n")
    assert read_gmt(f) == {"A": ["g1", "g2"], "B": ["g3"]}
    f.write_text("A\tdesc\n")
    with pytest.raises(SCFMInputError, match="no genes"):
        read_gmt(f)


def test_gene_graph_inputs_agree():
    genes = ["a", "b", "c", "d"]
    m = np.zeros((4, 4))
    m[0, 1] = m[2, 3] = 1
    e1 = as_gene_graph(m, genes)
    e2 = as_gene_graph(pd.DataFrame({"s": ["b", "c", "x"], "t": ["a", "d", "a"]}), genes)
    np.testing.assert_array_equal(e1, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(e1, e2)
    with pytest.raises(SCFMInputError, match="4 x 4"):
        as_gene_graph(np.zeros((3, 3)), genes)
    with pytest.raises(SCFMInputError, match="no edge"):
        as_gene_graph([("x", "y")], genes)


def test_set_graph_links_overlapping_and_connected_sets():
    si = np.array([0, 0, 1, 1, 2])
    gi = np.array([0, 1, 1, 2, 3])  # sets 0 and 1 share gene 1; set 2 shares nothing
    np.testing.assert_array_equal(set_graph(si, gi, 3), [[0, 1]])
    with_edge = set_graph(si, gi, 3, gene_edges=np.array([[2, 3]]))
    np.testing.assert_array_equal(with_edge, [[0, 1], [1, 2]])


# ---------------------------------------------------------------------- masked attention
@pytest.mark.parametrize("sparse_path", [False, True])
def test_attention_weights_are_zero_off_the_graph(sparse_path):
    torch.manual_seed(0)
    n = 7
    edges = torch.tensor([[0, 1], [1, 2], [4, 6]])
    attn = Attention(16, 2)
    x = torch.randn(3, n, 16)
    mask = graph_mask(edges, n)
    kwargs = {"neighbors": graph_neighbors(edges, n)} if sparse_path else {"attn_mask": mask}
    w = attn.attention_weights(x, **kwargs)  # (B, H, T, T)
    assert w.shape == (3, 2, n, n)
    assert torch.all(w[:, :, ~mask] == 0)  # exactly zero off the graph
    assert torch.all(w[:, :, mask] > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, n))
    # the forward pass uses those weights: tokens 3 and 5 see only themselves
    out = attn(x, **kwargs)
    v = attn.qkv(x)[..., 32:]
    np.testing.assert_allclose(
        out[:, 3].detach(), attn.proj(v[:, 3]).detach(), rtol=1e-5, atol=1e-6
    )


def test_sparse_and_dense_graph_attention_agree():
    torch.manual_seed(1)
    n = 12
    edges = torch.randint(0, n, (15, 2))
    block = TransformerBlock(16, 4).eval()
    x = torch.randn(2, n, 16)
    dense = block(x, attn_mask=graph_mask(edges, n))
    sparse = block(x, neighbors=graph_neighbors(edges, n))
    torch.testing.assert_close(dense, sparse, rtol=1e-5, atol=1e-5)
    nb = graph_neighbors(edges, n)
    assert nb.shape[1] < n  # neighbour lists are shorter than the full sequence


# ---------------------------------------------------------------------- tokenizers (nn)
def test_rank_tokenization_is_deterministic_and_breaks_ties_by_gene_index():
    enc = RankTokenEncoder(6, n_tokens=2, token_dim=2, hidden=8, depth=1, n_heads=2, top_k=4)
    x = torch.log1p(torch.tensor([[0.0, 3.0, 1.0, 3.0, 0.0, 1.0], [0, 0, 0, 0, 0, 2.0]]))
    idx = enc.tokenize(x)
    # ties (genes 1 and 3; genes 2 and 5) keep gene order; unexpressed genes never enter
    np.testing.assert_array_equal(idx, [[1, 3, 2, 5], [5, -1, -1, -1]])
    np.testing.assert_array_equal(enc.tokenize(x), idx)
    # dividing by the gene medians reorders: gene 5 is high for itself
    enc.set_gene_medians(torch.tensor([1.0, 6.0, 1.0, 3.0, 1.0, 0.1]))
    np.testing.assert_array_equal(enc.tokenize(x)[0], [5, 2, 3, 1])
    # a cell expressing nothing gets a finite latent (the cell token carries it)
    mean, var = enc(torch.zeros(2, 6))
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()


def test_rank_graph_mask_restricts_gene_tokens():
    enc = RankTokenEncoder(5, n_tokens=2, token_dim=2, hidden=8, depth=1, n_heads=2, top_k=5)
    enc2 = RankTokenEncoder(5, 2, 2, 8, 1, 2, top_k=5, n_edges=2)
    enc2.set_graph(torch.tensor([[0, 1]]))
    x = torch.log1p(torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0]]))
    idx = enc2.tokenize(x)  # genes 0, 1, 2
    m = enc2.gene_attention_mask(idx)[0, 0]  # (1 + L, 1 + L), cell token first
    expected = torch.tensor(
        [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool
    )
    np.testing.assert_array_equal(m, expected)
    assert enc.gene_attention_mask(idx)[0, 0].all()  # no graph: full attention
    with pytest.raises(ValueError, match="directed edges"):
        enc2.set_graph(torch.tensor([[0, 1], [1, 2]]))


def test_pathway_tokens_pool_member_genes():
    enc = PathwayTokenEncoder(
        5,
        n_sets=2,
        n_members=4,
        n_tokens=2,
        token_dim=2,
        hidden=8,
        depth=1,
        n_heads=2,
        n_channels=2,
    )
    enc.set_gene_sets(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3]))
    x = torch.zeros(1, 5)
    x[0, 4] = 7.0  # a gene in no set moves no token
    with torch.no_grad():
        assert torch.equal(enc.pooled_expression(x), torch.zeros(1, 2, 2))
        x[0, 2] = 2.0
        pooled = enc.pooled_expression(x)
    assert pooled[0, 0].abs().sum() == 0 and pooled[0, 1, 0] == pytest.approx(2.0 / 2**0.5)
    with pytest.raises(ValueError, match="past the last"):
        enc.set_gene_sets(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 3]))


def test_integrated_gradients_completeness():
    torch.manual_seed(0)
    w = torch.randn(5, 3)

    def fn(h):  # a smooth non-linear function, (B, 5, 3) -> (B,)
        return torch.tanh(h * w).sum((1, 2)) + (h.sum((1, 2)) ** 2) * 0.1

    x, b = torch.randn(4, 5, 3), torch.zeros(4, 5, 3)
    attr, gap = integrated_gradients(fn, x, b, n_steps=64)
    total = fn(x) - fn(b)
    torch.testing.assert_close(attr.sum((1, 2)) + gap, total)
    assert gap.abs().max() < 0.01 * total.abs().max()
    linear = integrated_gradients(lambda h: (h * w).sum((1, 2)), x, b, n_steps=1)[0]
    torch.testing.assert_close(linear, x * w)  # exact for a linear function


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
    assert z.shape == (a.n_obs, tiny_kwargs["token_dim"]) and np.isfinite(z).all()
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
    from test_perturbation import make_perturbation_adata, toy_features

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

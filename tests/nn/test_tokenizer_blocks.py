"""Tokenizer blocks: graph-masked attention (dense and neighbour lists), rank and pathway
tokens, integrated gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm_adapt.nn import (
    Attention,
    PathwayTokenEncoder,
    RankTokenEncoder,
    TransformerBlock,
    graph_mask,
    graph_neighbors,
    integrated_gradients,
)


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


@pytest.mark.parametrize("per_set", [False, True])
def test_pathway_tokens_tell_their_sets_apart(per_set):
    """Two sets with the same sums: one shared input map gives them the same token up to
    the small identity embedding; per-set maps give them different ones."""
    torch.manual_seed(0)
    kw = {"n_tokens": 2, "token_dim": 2, "hidden": 8, "depth": 1, "n_heads": 2, "n_channels": 2}
    enc = PathwayTokenEncoder(4, n_sets=2, n_members=4, per_set_inputs=per_set, **kw)
    enc.set_gene_sets(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        enc.member_weight.fill_(1.0)  # both sets sum their two genes
        enc.set_embed.zero_()
        h = enc.token_inputs(torch.tensor([[1.0, 2.0, 2.0, 1.0]]))  # equal sums, 3 and 3
    assert torch.equal(h[0, 0], h[0, 1]) != per_set
    names = {n for n, _ in enc.named_parameters()}
    assert ("set_in" in names, "token_in.weight" in names) == (per_set, not per_set)


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


def test_pathway_models_saved_before_per_set_inputs_rebuild_as_saved():
    from scfm_adapt.module._scfm import make_encoder

    old = {"n_sets": 3, "n_members": 6, "n_channels": 2, "n_edges": 0}  # no per_set_inputs
    enc = make_encoder("pathway", old, 10, 2, 2, 8, 1, 2, 0.0)
    assert not enc.per_set_inputs and hasattr(enc, "token_in")
    enc = make_encoder("pathway", old | {"per_set_inputs": True}, 10, 2, 2, 8, 1, 2, 0.0)
    assert enc.set_in.shape == (3, 2, 8)

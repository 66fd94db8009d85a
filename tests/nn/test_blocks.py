"""Pure torch blocks: shapes, identity at init, null conditions."""

import pytest
import torch

from scfm_adapt.nn import (
    DiT,
    DiTBlock,
    TimestepEmbedder,
    TokenDecoder,
    TokenEncoder,
    TransformerBlock,
)
from scfm_adapt.nn._embedding import CategoricalEmbedder, ContinuousEmbedder


def test_transformer_block_shapes():
    x = torch.randn(5, 7, 16)
    assert TransformerBlock(16, 4)(x).shape == (5, 7, 16)


def test_adaln_zero_block_is_identity_at_init():
    block = DiTBlock(32, 4)
    x, c = torch.randn(6, 5, 32), torch.randn(6, 32)
    assert torch.equal(block(x, c), x)


def test_adaln_block_is_not_identity_once_modulation_is_nonzero():
    block = DiTBlock(32, 4)
    torch.nn.init.normal_(block.adaLN[1].weight)
    x, c = torch.randn(6, 5, 32), torch.randn(6, 32)
    assert not torch.allclose(block(x, c), x)


def test_dit_output_is_zero_at_init_and_shaped_like_tokens():
    dit = DiT(8, 4, hidden=32, depth=2, n_heads=2, categorical_sizes={"batch": 3}, n_continuous=2)
    x, t = torch.randn(5, 8, 4), torch.randint(0, 1000, (5,))
    out = dit(x, t, {"batch": torch.tensor([0, 1, 2, 0, 1]), "continuous": torch.randn(5, 2)})
    assert out.shape == (5, 8, 4)
    assert torch.count_nonzero(out) == 0


def test_null_condition_equals_missing_condition():
    dit = DiT(4, 4, hidden=32, depth=1, n_heads=2, categorical_sizes={"batch": 3}, n_continuous=1)
    t = torch.arange(4)
    conds = {"batch": torch.tensor([0, 1, 2, 1]), "continuous": torch.randn(4, 1)}
    all_drop = {k: torch.ones(4, dtype=torch.bool) for k in conds}
    c_dropped = dit.embed_conditions(t, conds, all_drop)
    c_missing = dit.embed_conditions(t, {})
    c_cond = dit.embed_conditions(t, conds)
    assert torch.allclose(c_dropped, c_missing)
    assert not torch.allclose(c_cond, c_missing)


def test_embedders():
    emb = CategoricalEmbedder(3, 8)
    idx = torch.tensor([0, 1, 2])
    dropped = emb(idx, torch.tensor([True, False, True]))
    assert torch.equal(dropped[0], emb.table.weight[3]) and torch.equal(dropped[1], emb(idx)[1])
    cont = ContinuousEmbedder(2, 8)
    out = cont(torch.randn(3, 2), torch.tensor([False, True, False]))
    assert torch.equal(out[1], cont.null)
    assert TimestepEmbedder(16)(torch.tensor([0, 10, 999])).shape == (3, 16)


def test_token_encoder_and_decoder_shapes():
    enc = TokenEncoder(50, n_tokens=6, token_dim=3, hidden=16, depth=1, n_heads=2)
    mean, var = enc(torch.randn(4, 50))
    assert mean.shape == var.shape == (4, 6, 3)
    assert (var > 0).all()
    dec = TokenDecoder(50, 6, 3, hidden=16, categorical_sizes=[2], zero_inflation=True)
    scale, logits = dec(mean, [torch.tensor([0, 1, 0, 1])])
    assert scale.shape == logits.shape == (4, 50)
    assert torch.allclose(scale.sum(-1), torch.ones(4))


def test_part_attention_pool_starts_as_the_sum_and_stays_a_set_function():
    """Untrained: the dose-weighted sum exactly. With any weights: order-invariant, zero
    at dose zero, and a pair *not* the sum of its parts' read-outs (the weights of the
    parts depend on each other)."""
    from scfm_adapt.nn import PartAttentionPool

    torch.manual_seed(0)
    pool = PartAttentionPool(8, n_heads=2)
    phi = torch.randn(3, 2, 8)
    w = torch.tensor([[1.0, 0.5], [1.0, 0.0], [0.0, 0.0]])
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    torch.testing.assert_close(pool(phi, w, valid), (phi * w.unsqueeze(-1)).sum(1))
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = pool(phi, w, valid)
    swapped = pool(phi.flip(1), w.flip(1), valid.flip(1))
    torch.testing.assert_close(out, swapped)
    assert torch.all(out[2] == 0)  # every dose zero
    a = pool(phi[:1, :1], w[:1, :1], valid[:1, :1])  # each part alone
    b = pool(phi[:1, 1:], w[:1, 1:], valid[:1, 1:])
    assert (out[0] - (a + b)[0]).abs().max() > 1e-3
    padding_only = pool(phi[:1], torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert torch.all(padding_only == 0) and torch.isfinite(padding_only).all()


def test_token_encoder_factorises_the_gene_map_only_where_it_saves_work():
    sizes = dict(n_tokens=8, token_dim=4, hidden=16, depth=1, n_heads=2)
    # 32 * (400 + 8 * 16) < 400 * 8 * 16: the factorised map is cheaper.
    low = TokenEncoder(400, rank=32, **sizes)
    assert low.gene_down.weight.shape == (32, 400)
    assert low.gene_to_tokens.in_features == 32
    full = TokenEncoder(400, rank=None, **sizes)
    assert full.gene_down is None and full.gene_to_tokens.in_features == 400
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    assert n_params(low) < n_params(full)
    # 32 * (20 + 128) > 20 * 128: a factorised map would cost more, so none is built.
    few = TokenEncoder(20, rank=32, **sizes)
    assert few.gene_down is None and few.gene_to_tokens.in_features == 20
    with pytest.raises(ValueError, match="encoder_rank=0"):
        TokenEncoder(400, rank=0, **sizes)


@pytest.mark.parametrize("rank", [None, 32])
def test_token_encoder_mean_equals_the_forward_mean(rank):
    torch.manual_seed(0)
    enc = TokenEncoder(400, n_tokens=8, token_dim=4, hidden=16, depth=1, n_heads=2, rank=rank)
    enc.eval()
    x = torch.randn(5, 400)
    with torch.no_grad():
        torch.testing.assert_close(enc.mean(x), enc(x)[0])

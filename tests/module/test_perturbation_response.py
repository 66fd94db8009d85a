"""The response head's training loop (tensors only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm_adapt.module import ResponseHead, fit_response_head

D = 4


def _data(n_units: int = 3, cells: int = 40, seed: int = 0):
    """Control cells (rows 0..cells-1) and ``n_units`` perturbed groups, each the control
    distribution shifted by its own vector."""
    g = torch.Generator().manual_seed(seed)
    ctrl = torch.randn(cells, D, generator=g)
    shifts = 2 * torch.randn(n_units, D, generator=g)
    groups = [torch.randn(cells, D, generator=g) + shifts[u] for u in range(n_units)]
    zs = torch.cat([ctrl, *groups])
    control_cells = [np.arange(cells)] * n_units
    unit_cells = [np.arange(cells * (u + 1), cells * (u + 2)) for u in range(n_units)]
    part_idx = torch.arange(n_units).unsqueeze(1)
    requests = (part_idx, torch.zeros(n_units, 1, 0), torch.ones(n_units, 1))
    return zs, control_cells, unit_cells, requests, shifts


def _fit(head, zs, control_cells, unit_cells, requests, anchor, steps=150, **kw):
    args = dict(steps=steps, cells_per_unit=16, units_per_step=3, lr=3e-3, weight_decay=0.0)
    args.update(mmd_weight=0.0, grad_clip=10.0, rng=np.random.default_rng(0), **kw)
    return fit_response_head(
        head, zs, [0, 1, 2], control_cells, unit_cells, requests, anchor, **args
    )


def test_the_loss_falls_and_the_head_learns_each_units_shift():
    torch.manual_seed(0)
    zs, cc, uc, req, shifts = _data()
    head = ResponseHead(D, 0, 3, emb_dim=8, hidden=32, n_layers=2, dropout=0.0)
    calls = []
    losses = _fit(head, zs, cc, uc, req, torch.zeros(3, D), on_step=lambda: calls.append(1))
    assert len(calls) == 150 and losses[-1] < 0.2 * losses[0]
    head.eval()
    with torch.no_grad():
        e = head.embed(*req)
        learned = torch.stack([head(zs[:40], e[u].expand(40, -1)).mean(0) for u in range(3)])
    assert (learned - shifts).abs().mean() < 0.5 * shifts.abs().mean()


def test_an_exact_anchor_leaves_nothing_to_learn():
    zs, cc, uc, req, _ = _data()
    observed = torch.stack([zs[u].mean(0) - zs[c].mean(0) for u, c in zip(uc, cc)])
    head = ResponseHead(D, 0, 3, emb_dim=8, hidden=32, n_layers=2, dropout=0.0)
    torch.manual_seed(0)
    without = _fit(head, zs, cc, uc, req, torch.zeros(3, D), steps=1)
    head = ResponseHead(D, 0, 3, emb_dim=8, hidden=32, n_layers=2, dropout=0.0)
    torch.manual_seed(0)
    with_anchor = _fit(head, zs, cc, uc, req, observed, steps=1)
    # an untrained head adds 0, so the first loss is the anchor's error alone
    assert with_anchor[0] < 0.1 * without[0]


def test_a_non_finite_loss_raises():
    zs, _, uc, req, _ = _data()
    zs[0] = float("nan")
    head = ResponseHead(D, 0, 3, emb_dim=8, hidden=32, n_layers=2, dropout=0.0)
    with pytest.raises(FloatingPointError, match="response loss"):
        _fit(head, zs, [np.array([0])] * 3, uc, req, torch.zeros(3, D), steps=5)


def _flow(**kw):
    from scfm_adapt.module import ResponseFlow

    args = dict(emb_dim=8, hidden=32, depth=1, n_heads=2, n_steps=4, noise=0.1)
    args.update(kw)
    return ResponseFlow(2, 2, 0, 3, **args)  # latents of 2 tokens of width 2 (D = 4)


def _fit_flow(flow, zs, units, control_cells, unit_cells, req, **kw):
    """Flow matching on ``units`` (300 steps unless ``steps=``; no anchor shift); the loss
    curve."""
    from scfm_adapt.module import fit_response_flow

    args = dict(steps=300, cells_per_unit=16, units_per_step=len(units), lr=3e-3)
    args.update(weight_decay=0.0, grad_clip=10.0, rng=np.random.default_rng(0))
    args.update(kw)
    shift = torch.zeros(len(units), zs.shape[1])
    return fit_response_flow(flow, zs, units, control_cells, unit_cells, req, shift, **args)


def test_an_untrained_flow_moves_nothing_and_dose_zero_never_moves():
    zs, _, _, req, _ = _data()
    flow = _flow()
    e = flow.embed(*req)
    torch.manual_seed(0)
    assert torch.all(flow(zs[:10], e[0]) == 0)
    with torch.no_grad():  # any weights: the null embedding (dose 0) gives no velocity
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    zero = flow.embed(req[0][:1], req[1][:1], torch.zeros(1, 1))[0]
    assert torch.all(zero == 0) and torch.all(flow(zs[:10], zero) == 0)
    assert flow(zs[:10], flow.embed(*req)[0]).abs().sum() > 0


def test_the_flow_learns_each_units_shift_and_a_seed_fixes_its_cells():

    torch.manual_seed(0)
    zs, cc, uc, req, shifts = _data()
    flow = _flow()
    losses = _fit_flow(flow, zs, [0, 1, 2], cc, uc, req)
    assert losses[-1] < 0.5 * losses[0]
    flow.eval()
    with torch.no_grad():
        e = flow.embed(*req)
        torch.manual_seed(1)
        moved = torch.stack([flow(zs[:40], e[u]).mean(0) for u in range(3)])
        torch.manual_seed(1)
        again = torch.stack([flow(zs[:40], e[u]).mean(0) for u in range(3)])
        torch.manual_seed(2)
        other = torch.stack([flow(zs[:40], e[u]).mean(0) for u in range(3)])
    assert (moved - shifts).abs().mean() < 0.5 * shifts.abs().mean()
    assert torch.equal(moved, again) and not torch.equal(moved, other)


def test_a_flow_from_the_prior_copies_it_and_still_starts_at_zero():
    """``prior=``: the flow's DiT is a trainable copy of the backbone's prior (blocks,
    token and time embeddings), its new perturbation embedding starts at zero so the
    untrained velocity is exactly zero, and that embedding still gets a gradient."""
    from scfm_adapt.module import ResponseFlow
    from scfm_adapt.nn import DiT

    torch.manual_seed(0)
    prior = DiT(2, 2, hidden=16, depth=2, n_heads=2, categorical_sizes={"batch": 3})
    with torch.no_grad():  # a "trained" prior: every weight non-zero
        for p in prior.parameters():
            p.add_(0.1 * torch.randn_like(p))
    prior.requires_grad_(False)
    flow = ResponseFlow(2, 2, 0, 3, emb_dim=8, n_steps=4, noise=0.0, prior=prior)
    for name, p in prior.named_parameters():
        if not name.startswith("cont_embed"):
            assert torch.equal(flow.dit.get_parameter(name), p), name
    assert flow.dit is not prior and all(p.requires_grad for p in flow.dit.parameters())
    zs, _, _, req, _ = _data()
    e = flow.embed(*req)
    assert torch.all(flow(zs[:10], e[0].detach()) == 0)
    t = torch.full((10,), 0.3)
    v = flow.velocity(zs[:10], t, e[0].expand(10, -1))
    assert torch.all(v == 0)
    loss = (v - 1.0).pow(2).sum()
    loss.backward()
    assert flow.dit.cont_embed.proj.weight.grad.abs().sum() > 0
    before = prior.blocks[0].adaLN[1].weight.clone()
    with torch.no_grad():  # a copy: training the flow never moves the prior
        flow.dit.blocks[0].adaLN[1].weight.add_(1.0)
    assert torch.equal(prior.blocks[0].adaLN[1].weight, before)
    with pytest.raises(ValueError, match="tokens"):
        ResponseFlow(4, 2, 0, 3, emb_dim=8, prior=prior)


def test_the_flow_reads_its_context_and_the_null_context_stands_for_unseen_ones():
    """With ``n_contexts``: the velocity is still exactly zero untrained and at dose zero
    in every context; once trained, contexts move cells differently, and an index of
    ``-1`` or out of range is the null context."""
    zs, _, _, req, _ = _data()
    flow = _flow(n_contexts=2)
    e = flow.embed(*req)
    for c in (0, 1, -1):
        assert torch.all(flow(zs[:10], e[0], torch.tensor([c])) == 0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t = zs[:10], torch.full((10,), 0.5)
    e0 = flow.embed(*req)[0].expand(10, -1)
    v = {c: flow.velocity(x, t, e0, torch.full((10,), c)) for c in (0, 1, -1, 7)}
    assert (v[0] - v[1]).abs().max() > 1e-4
    assert torch.equal(v[-1], v[7])  # an unseen context: the null
    torch.testing.assert_close(v[-1], flow.velocity(x, t, e0))  # no context given: the null
    assert torch.all(flow.velocity(x, t, torch.zeros_like(e0), torch.zeros(10)) == 0)


def test_a_flow_with_contexts_learns_a_response_that_differs_by_context():
    """The same perturbation moves the cells of two contexts in opposite directions, from
    the same control distribution: only the context tells them apart. A flow conditioned
    on the context learns both shifts; without it, it can only learn their average."""

    g = torch.Generator().manual_seed(0)
    cells = 60
    ctrl = torch.randn(2 * cells, D, generator=g)
    shift = torch.tensor([2.0, -1.0, 1.5, 0.0])
    up = torch.randn(cells, D, generator=g) + shift
    down = torch.randn(cells, D, generator=g) - shift
    zs = torch.cat([ctrl, up, down])
    control_cells = [np.arange(cells), np.arange(cells, 2 * cells)]
    unit_cells = [np.arange(2 * cells, 3 * cells), np.arange(3 * cells, 4 * cells)]
    req = (torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, 0), torch.ones(2, 1))
    moved = {}
    for n_contexts in (2, 0):
        torch.manual_seed(0)
        flow = _flow(n_contexts=n_contexts, noise=0.0)
        _fit_flow(flow, zs, [0, 1], control_cells, unit_cells, req, contexts=torch.tensor([0, 1]))
        flow.eval()
        with torch.no_grad():
            e = flow.embed(*req)[0]
            moved[n_contexts] = [flow(ctrl[:cells], e, torch.tensor([c])).mean(0) for c in (0, 1)]
    with_ctx, without = moved[2], moved[0]
    assert (with_ctx[0] - shift).abs().mean() < 0.4 * shift.abs().mean()
    assert (with_ctx[1] + shift).abs().mean() < 0.4 * shift.abs().mean()
    assert (without[0] - shift).abs().mean() > 0.7 * shift.abs().mean()


def test_a_context_the_flow_never_trained_on_reads_as_the_null():
    """Units of context 0 only (context 1 known by its control cells, as a held-out cell
    type): after training, context 1's embedding is the trained null's, context 0's its own,
    so context 1 moves cells exactly as an unseen context does."""
    zs, cc, uc, req, _ = _data()
    torch.manual_seed(0)
    flow = _flow(n_contexts=2, noise=0.0)
    _fit_flow(flow, zs, [0, 1], cc, uc, req, contexts=torch.tensor([0, 0, 1]), steps=50)
    table = flow.dit.cat_embed[flow.CONTEXT].table.weight
    assert torch.equal(table[1], table[2]) and not torch.equal(table[0], table[2])
    assert table[2].abs().sum() > 0  # the null trained (classifier-free dropout)
    with torch.no_grad():
        e = flow.embed(*req)[0]
        one = flow(zs[:10], e, torch.tensor([1]))
        unseen = flow(zs[:10], e, torch.tensor([-1]))
    assert torch.equal(one, unseen)

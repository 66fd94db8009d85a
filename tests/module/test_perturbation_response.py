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

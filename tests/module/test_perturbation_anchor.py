"""LatentAnchor: the simple models a perturbation response starts from, on hand-made shifts."""

from __future__ import annotations

import torch

from scfm_adapt.module import LatentAnchor

D = 3
#: parts: 0 = A, 1 = B, 2 = C (only ever seen with A); contexts 0 and 1
SHIFT = {
    ("A", 0): torch.tensor([1.0, 0.0, 0.0]),
    ("A", 1): torch.tensor([3.0, 0.0, 0.0]),
    ("B", 0): torch.tensor([0.0, 2.0, 0.0]),
}
PART = {"A": 0, "B": 1, "C": 2}


def _units():
    """Singles A (both contexts) and B (context 0), and A+C in context 0, where C adds
    (0, 0, 5)."""
    rows = [(0, ["A"]), (1, ["A"]), (0, ["B"]), (0, ["A", "C"])]
    ctx = torch.tensor([c for c, _ in rows])
    idx = torch.full((len(rows), 2), -1, dtype=torch.long)
    for i, (_, parts) in enumerate(rows):
        idx[i, : len(parts)] = torch.tensor([PART[p] for p in parts])
    dose = (idx >= 0).float()
    shifts = torch.stack(
        [
            SHIFT[("A", 0)],
            SHIFT[("A", 1)],
            SHIFT[("B", 0)],
            SHIFT[("A", 0)] + torch.tensor([0, 0, 5.0]),
        ]
    )
    return ctx, idx, dose, shifts


def _request(anchor, ctx, parts, dose=None, features=None):
    idx = torch.tensor([[PART.get(p, anchor.n_parts) for p in parts]])
    dose = torch.ones(1, len(parts)) if dose is None else torch.tensor([dose])
    f = torch.zeros(1, len(parts), 0) if features is None else features
    return anchor(torch.tensor([ctx]), idx, f, dose)[0]


def _fitted(features=None):
    ctx, idx, dose, shifts = _units()
    n_feat = 0 if features is None else features.shape[1]
    return LatentAnchor(D, n_parts=3, n_contexts=3, n_features=n_feat).fit(
        ctx, idx, dose, shifts, features
    )


def test_a_part_in_its_context_gets_its_own_shift_and_elsewhere_the_mean_of_the_others():
    anchor = _fitted()
    torch.testing.assert_close(_request(anchor, 0, ["A"]), SHIFT[("A", 0)])
    torch.testing.assert_close(_request(anchor, 1, ["A"]), SHIFT[("A", 1)])
    # B in a context it was never perturbed in, and in an unknown context: latent arithmetic
    torch.testing.assert_close(_request(anchor, 1, ["B"]), SHIFT[("B", 0)])
    torch.testing.assert_close(_request(anchor, 2, ["A"]), torch.tensor([2.0, 0, 0]))
    torch.testing.assert_close(_request(anchor, -1, ["A"]), torch.tensor([2.0, 0, 0]))


def test_a_combination_is_the_sum_of_its_parts_in_any_order():
    anchor = _fitted()
    ab = _request(anchor, 1, ["A", "B"])
    torch.testing.assert_close(ab, SHIFT[("A", 1)] + SHIFT[("B", 0)])
    torch.testing.assert_close(_request(anchor, 1, ["B", "A"]), ab)
    # C, never perturbed alone, has no shift of its own: the mean shift of every unit, as
    # in the additive baseline
    _, _, _, shifts = _units()
    torch.testing.assert_close(_request(anchor, 0, ["C"]), shifts.mean(0))
    assert anchor.part_known[PART["C"]] == 0


def test_dose_zero_gives_no_shift_and_dose_scales_it():
    anchor = _fitted()
    torch.testing.assert_close(_request(anchor, 0, ["A"], dose=[0.0]), torch.zeros(D))
    # dose_scale(3) = log(4) / log(2) = 2
    torch.testing.assert_close(_request(anchor, 0, ["A"], dose=[3.0]), 2 * SHIFT[("A", 0)])


def test_an_unseen_part_without_features_gets_the_mean_shift_of_every_unit():
    anchor = _fitted()
    _, _, _, shifts = _units()
    torch.testing.assert_close(_request(anchor, 0, ["NEW"]), shifts.mean(0))
    assert anchor.part_known[anchor.n_parts] == 0  # the unseen row stays unknown


def test_an_unseen_part_gets_the_linear_map_of_its_features_when_they_predict_shifts():
    # 12 seen singles whose shift is a linear function of their features
    g = torch.Generator().manual_seed(0)
    n, f = 12, 4
    feats = torch.randn(n, f, generator=g)
    true_map = torch.randn(f, D, generator=g)
    shifts = feats @ true_map
    idx = torch.arange(n).unsqueeze(1)
    anchor = LatentAnchor(D, n_parts=n, n_contexts=1, n_features=f).fit(
        torch.zeros(n, dtype=torch.long), idx, torch.ones(n, 1), shifts, feats
    )
    new = torch.randn(1, 1, f, generator=g)
    got = anchor(torch.tensor([0]), torch.tensor([[n]]), new, torch.ones(1, 1))[0]
    torch.testing.assert_close(got, (new[0, 0] @ true_map), atol=0.1, rtol=0.05)
    # features unrelated to the shifts: leave-one-out keeps the mean shift alone
    noise = torch.randn(n, f, generator=g)
    anchor = LatentAnchor(D, n_parts=n, n_contexts=1, n_features=f).fit(
        torch.zeros(n, dtype=torch.long),
        idx,
        torch.ones(n, 1),
        torch.randn(n, D, generator=g),
        noise,
    )
    assert torch.all(anchor.feature_map == 0)


def test_the_parts_that_take_the_arithmetic_rule_and_the_rest_add_up_to_the_whole():
    import pytest

    anchor = _fitted()

    def shift(ctx, parts, which):
        idx = torch.tensor([[PART[p] for p in parts]])
        f, dose = torch.zeros(1, len(parts), 0), torch.ones(1, len(parts))
        return anchor(torch.tensor([ctx]), idx, f, dose, parts=which)[0]

    # in context 1, A was perturbed (its own shift) and B was not (arithmetic from context 0)
    torch.testing.assert_close(shift(1, ["A", "B"], "arithmetic"), SHIFT[("B", 0)])
    torch.testing.assert_close(shift(1, ["A", "B"], "other"), SHIFT[("A", 1)])
    both = shift(1, ["A", "B"], "arithmetic") + shift(1, ["A", "B"], "other")
    torch.testing.assert_close(both, shift(1, ["A", "B"], "all"))
    # in context 0 both were perturbed: nothing takes the rule; C never alone: not either
    assert torch.all(shift(0, ["A", "B", "C"], "arithmetic") == 0)
    mask = anchor.arithmetic_parts(torch.tensor([1, 2]), torch.tensor([[0, 1], [2, -1]]))
    assert mask.tolist() == [[False, True], [False, False]]
    with pytest.raises(ValueError, match="parts="):
        shift(0, ["A"], "some")

"""sfa.baselines of perturbation responses, on hand-computed cases."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scfm_adapt as sfa

B = sfa.baselines


def test_unit_means_by_hand():
    values = np.array([[0.0], [2.0], [5.0], [7.0], [1.0], [10.0]])
    obs = pd.DataFrame(
        {
            "p": ["ctrl", "ctrl", "A", "A", "ctrl", "B+A"],
            "c": ["x", "x", "x", "x", "y", "y"],
        }
    )
    means, ctrl, deltas = B.unit_means(values, obs, "p", "ctrl", ["c"])
    assert set(means) == {("x", "ctrl"), ("x", "A"), ("y", "ctrl"), ("y", "A+B")}
    assert ctrl == {"x": pytest.approx([1.0]), "y": pytest.approx([1.0])}
    # A in x: 6 - 1; the combination "B+A" is named "A+B": 10 - 1
    assert deltas == {("x", "A"): pytest.approx([5.0]), ("y", "A+B"): pytest.approx([9.0])}


def test_shift_by_rule_by_hand():
    deltas = {
        ("x", "A"): np.array([1.0, 0.0]),
        ("y", "A"): np.array([3.0, 0.0]),
        ("y", "B"): np.array([0.0, 2.0]),
    }
    # mean: A in the *other* contexts
    np.testing.assert_allclose(B.shift_by_rule(deltas, "A", "x"), [3.0, 0.0])
    # no other context has B: the average of every unit, (4/3, 2/3)
    np.testing.assert_allclose(B.shift_by_rule(deltas, "B", "y"), [4 / 3, 2 / 3])
    # additive: A measured in x, B averaged over contexts (only y)
    parts = ["A", "B"]
    np.testing.assert_allclose(
        B.shift_by_rule(deltas, "A+B", "x", parts, rule="additive"), [1.0, 2.0]
    )
    # a part never measured adds the average of every unit
    np.testing.assert_allclose(
        B.shift_by_rule(deltas, "A+Q", "x", ["A", "Q"], rule="additive"), [1 + 4 / 3, 2 / 3]
    )
    with pytest.raises(ValueError, match="rule"):
        B.shift_by_rule(deltas, "A", "x", rule="median")


def test_table_needs_controls_and_shifted_cells_adds_the_delta():
    x = np.full((4, 3), 10.0)
    obs = pd.DataFrame({"p": ["A", "A", "B", "B"]}, index=[f"c{i}" for i in range(4)])
    with pytest.raises(ValueError, match="control"):
        B.PerturbationTable(ad.AnnData(x, obs=obs), "p", "ctrl")
    ctrl = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(B.shifted_cells(ctrl, [0.5, -1.0]), [[1.5, 1.0], [3.5, 3.0]])


def test_table_deltas_are_log_normalised_means():
    # libraries of 10,000: log-normalised expression is log1p(counts)
    x = np.array([[5000.0, 5000.0], [5000.0, 5000.0], [9000.0, 1000.0], [7000.0, 3000.0]])
    obs = pd.DataFrame({"p": ["ctrl", "ctrl", "A", "A"]}, index=[f"c{i}" for i in range(4)])
    table = B.PerturbationTable(ad.AnnData(x, obs=obs), "p", "ctrl")
    expected = np.log1p([[9000, 1000], [7000, 3000]]).mean(0) - np.log1p([5000, 5000])
    np.testing.assert_allclose(table.deltas[("", "A")], expected)
    np.testing.assert_allclose(B.mean_shift_delta(table, "A"), expected)  # the only unit
    np.testing.assert_allclose(table.average_delta(), expected)
    assert table.perturbations == ["A"]

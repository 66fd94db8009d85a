"""sfa.baselines of perturbation responses, on hand-computed cases."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scfm_adapt as sfa
from conftest import control_cells, make_perturbation_adata

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


# ------------------------------------------------------------------ baselines
def _toy_table():
    import anndata as ad

    # genes: 4; library 10,000 per cell so log-normalised = log1p(counts)
    def cells(v, n=3):
        return np.tile(np.asarray(v, float), (n, 1))

    blocks = {
        ("control", "x"): [2500, 2500, 2500, 2500],
        ("A", "x"): [4000, 1000, 2500, 2500],
        ("control", "y"): [1000, 4000, 2500, 2500],
        ("A", "y"): [2500, 2500, 2500, 2500],
        ("B", "y"): [1000, 4000, 4000, 1000],
    }
    x = np.concatenate([cells(v) for v in blocks.values()])
    obs = pd.DataFrame(
        [k for k in blocks for _ in range(3)], columns=["perturbation", "ctx"], dtype=str
    )
    obs.index = obs.index.astype(str)
    a = ad.AnnData(x, obs=obs)
    a.var_names = [f"g{i}" for i in range(4)]
    return (
        a,
        B.PerturbationTable(a, "perturbation", "control", ["ctx"]),
        {k: np.log1p(np.asarray(v, float)) for k, v in blocks.items()},
    )


def test_shift_baselines_by_hand():
    _, table, m = _toy_table()
    d_ax = m[("A", "x")] - m[("control", "x")]
    d_ay = m[("A", "y")] - m[("control", "y")]
    d_by = m[("B", "y")] - m[("control", "y")]
    assert np.allclose(table.deltas[("x", "A")], d_ax)
    # mean shift: A in the *other* context
    assert np.allclose(B.mean_shift_delta(table, "A", "x"), d_ay)
    assert np.allclose(B.mean_shift_delta(table, "A", "z"), (d_ax + d_ay) / 2)
    # unseen elsewhere: the average of all units
    assert np.allclose(B.mean_shift_delta(table, "B", "y"), (d_ax + d_ay + d_by) / 3)
    # additive: own-context singles summed; a part unseen in the context is averaged
    assert np.allclose(B.additive_delta(table, "B+A", "y"), d_ay + d_by)
    assert np.allclose(B.additive_delta(table, "A+B", "x"), d_ax + d_by)
    ctrl = np.zeros((2, 4))
    assert np.allclose(B.shifted_cells(ctrl, d_ax), np.tile(d_ax, (2, 1)))


def test_linear_baseline_fits_training_units():
    _, table, _ = _toy_table()
    feats = pd.DataFrame(np.eye(2), index=["A", "B"])
    lin = B.LinearPCARidge(n_components=4, ridge=1e-6, pert_features=feats).fit(table)
    for (c, p), d in table.deltas.items():
        pred = lin.predict_delta(p, table.ctrl[c])
        assert np.corrcoef(pred, d)[0, 1] > 0.99, (c, p)
    # an unknown part contributes nothing beyond the context and the bias
    out = lin.predict_delta("Q", table.ctrl["x"])
    assert out.shape == (4,) and np.all(np.isfinite(out))


def test_scvi_latent_arithmetic_smoke():
    a = make_perturbation_adata(n_per_group=20)
    train = a[~((a.obs["condition"] == "A") & (a.obs["context"] == "ctx1")).to_numpy()].copy()
    arith = B.ScVILatentArithmetic("condition", "control", ["context"], max_epochs=3).fit(train)
    ctrl = control_cells(a, "ctx1")
    out = arith.predict(ctrl, "A", "ctx1", output="sample", seed=0)
    assert out.shape == (ctrl.n_obs, a.n_vars) and np.isfinite(out).all()
    again = arith.predict(ctrl, "A", "ctx1", output="sample", seed=0)
    assert np.array_equal(out, again)
    mean = arith.predict(ctrl, "A", "ctx1", output="mean")
    assert not np.array_equal(out, mean)

"""sfa.metrics of predicted perturbation responses, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scfm_adapt as sfa

M = sfa.metrics


def test_pearson_delta_of_three_genes():
    ctrl = np.array([[1.0, 1.0, 1.0]])
    true = np.array([[2.0, 1.0, 0.0]])  # delta (1, 0, -1)
    pred = np.array([[2.0, 2.0, 1.0]])  # delta (1, 1, 0)
    # both deltas centred: (1, 0, -1) and (1/3, 1/3, -2/3); r = 1 / sqrt(2 * 2/3)
    assert M.pearson_delta(pred, true, ctrl) == pytest.approx(1 / np.sqrt(4 / 3))
    # top-2 DE genes by |true delta| are genes 0 and 2 (tie broken by gene order)
    assert list(M.de_genes(true, ctrl, 2)) == [0, 2]
    assert M.pearson_delta(pred, true, ctrl, top_k=2) == pytest.approx(1.0)
    # cosine: (1*1 + 0*1 + -1*0) / (sqrt 2 * sqrt 2)
    assert M.cosine_lfc(pred, true, ctrl) == pytest.approx(0.5)
    # signs over the 3 genes, predicted (+, +, 0) vs true (+, 0, -): 1 of 3 agree
    assert M.sign_accuracy(pred, true, ctrl, top_k=3) == pytest.approx(1 / 3)


def test_r2_means_by_hand_and_undefined_cases():
    ctrl = np.zeros((1, 3))
    true = np.array([[3.0, -2.0, 1.0]])
    pred = np.array([[2.0, -2.0, 0.0]])
    # over all 3 genes: SS_res = 1 + 0 + 1, SS_tot = sum((t - 2/3)^2) = 38/3
    assert M.r2_means(pred, true, ctrl, top_k=3) == pytest.approx(1 - 2 / (38 / 3))
    assert np.isnan(M.r2_means(pred, true, ctrl, top_k=1))  # one gene: no variance
    assert np.isnan(M.pearson_delta(ctrl, true, ctrl))  # a constant delta
    with pytest.raises(ValueError, match="positive"):
        M.de_genes(true, ctrl, 0)


def test_rank_metric_of_three_units():
    true = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    pred = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    # unit 0: own distance 0, others 1 and 3 -> 0 closer -> 0
    # unit 1 (at 2): own 1, unit 0 at 2, unit 2 at 1 (a tie) -> (0 + 0.5) / 2
    # unit 2 (at 1): own 2, unit 0 at 1 and unit 1 at 0 are closer -> 2 / 2
    np.testing.assert_allclose(M.rank_metric(pred, true), [0.0, 0.25, 1.0])
    with pytest.raises(ValueError, match="same"):
        M.rank_metric(pred, true[:, :1])


def test_perturbation_energy_distance_of_one_dimensional_sets():
    reference = np.array([[-1.0], [0.0], [4.0]])  # one PC: distances are kept
    x, y = np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]])
    # E|x-y| = (1 + 3 + 1 + 1) / 4 = 1.5, E|x-x'| = E|y-y'| = (0 + 2 + 2 + 0) / 4 = 1
    assert M.perturbation_energy_distance(x, y, reference) == pytest.approx(1.0)
    assert M.perturbation_energy_distance(x, x, reference) == 0.0
    with pytest.raises(ValueError, match="two cells"):
        M.perturbation_energy_distance(x, y, reference[:1])


def test_evaluate_predictions_and_summarize():
    ctrl = np.zeros((2, 3))
    true = {"u1": np.array([[1.0, 0.0, -1.0]]), "u2": np.array([[0.0, 2.0, 0.0]])}
    preds = {"exact": dict(true), "swapped": {"u1": true["u2"], "u2": true["u1"]}}
    scores = M.evaluate_predictions(preds, true, {"u1": ctrl, "u2": ctrl})
    assert list(scores["method"]) == ["exact", "exact", "swapped", "swapped"]
    assert set(scores.columns) == {"method", "unit", "rank", *M.METRICS} - {"energy"}
    exact = scores.loc[scores["method"] == "exact", "pearson_delta"].to_numpy()
    np.testing.assert_allclose(exact, [1.0, 1.0])
    # a swapped prediction is sqrt(6) from its own unit's truth and 0 from the other's
    assert list(scores["rank"]) == [0.0, 0.0, 1.0, 1.0]
    table = M.summarize(scores)
    assert list(table.index) == ["exact", "swapped"]
    assert table.loc["swapped", "rank"] == 1.0
    one = M.evaluate_predictions({"a": {"u1": true["u1"]}}, {"u1": true["u1"]}, {"u1": ctrl})
    assert np.isnan(one["rank"]).all()
    with pytest.raises(ValueError, match="no prediction"):
        M.evaluate_predictions({"a": {"u1": true["u1"]}}, true, {"u1": ctrl, "u2": ctrl})


def test_evaluate_unit_has_energy_only_with_a_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    assert "energy" not in M.evaluate_unit(x + 1, x, x)
    out = M.evaluate_unit(x + 1, x, x, reference=rng.normal(size=(30, 5)))
    assert set(out) == set(M.METRICS)
    frame = pd.DataFrame([{"method": "m", "unit": "u", **out}, {"method": "m", "unit": "v", **out}])
    assert list(M.summarize(frame, ["energy"]).columns) == ["energy"]
    assert M.summarize(frame).loc["m", "energy"] == pytest.approx(out["energy"])


# ------------------------------------------------------------------ metrics
def test_metrics_on_hand_computed_cases():
    ctrl = np.zeros((2, 4))
    true = np.array([[1.0, 2.0, -1.0, 0.0], [1.0, 2.0, -1.0, 0.0]])
    pred = np.array([[2.0, 4.0, -2.0, 0.0]])  # delta twice the truth: r = 1, cosine = 1
    assert M.pearson_delta(pred, true, ctrl) == pytest.approx(1.0)
    assert M.cosine_lfc(pred, true, ctrl) == pytest.approx(1.0)
    assert list(M.de_genes(true, ctrl, 2)) == [1, 0]
    # R² over the top-3 DE genes (ordered 1, 0, 2): true means (2, 1, -1), predicted (4, 2, -2)
    mt = np.array([2.0, 1.0, -1.0])
    mp = np.array([4.0, 2.0, -2.0])
    expected = 1 - ((mt - mp) ** 2).sum() / ((mt - mt.mean()) ** 2).sum()
    assert M.r2_means(pred, true, ctrl, top_k=3) == pytest.approx(expected)
    flipped = np.array([[1.0, -2.0, 1.0, 0.0]])
    assert M.sign_accuracy(flipped, true, ctrl, top_k=3) == pytest.approx(1 / 3)
    assert M.pearson_delta(flipped, true, ctrl, top_k=2) == pytest.approx(-1.0)
    assert np.isnan(M.cosine_lfc(ctrl, true, ctrl))  # no change: undefined


def test_rank_metric_exposes_identical_predictions():
    true = np.eye(4)
    assert np.allclose(M.rank_metric(true, true), 0.0)
    same = np.tile(np.full(4, 0.25), (4, 1))
    assert np.allclose(M.rank_metric(same, true), 0.5)
    swapped = true[[1, 0, 2, 3]]
    r = M.rank_metric(swapped, true)
    # e1 is strictly closer than its own e0, e2 and e3 tie with it: (1 + 2/2) / 3
    assert r[0] == pytest.approx(2 / 3) and r[2] == 0.0
    with pytest.raises(ValueError):
        M.rank_metric(true[:1], true[:1])


def test_energy_distance_and_lognorm():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 10))
    x = rng.normal(size=(100, 10))
    assert M.perturbation_energy_distance(x, x, ref) == pytest.approx(0.0, abs=1e-9)
    assert (
        M.perturbation_energy_distance(x + 2.0, x, ref)
        > M.perturbation_energy_distance(x + 0.5, x, ref)
        > 0
    )
    counts = np.array([[1.0, 3.0], [0.0, 2.0]])
    assert np.allclose(M.lognorm(counts), np.log1p(counts / counts.sum(1, keepdims=True) * 1e4))
    with pytest.raises(ValueError, match="non-negative"):
        M.lognorm(-counts)
    out = M.evaluate_unit(x + 0.1, x, x, reference=ref)
    assert set(out) == set(M.METRICS)

"""sfa.metrics of classifiers' predictions: accuracy, F1, NLL, calibration."""

from __future__ import annotations

import numpy as np
import pytest

import scfm_adapt as sfa

M = sfa.metrics


def test_ece_of_four_predictions_in_two_bins():
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # right, confidence 0.9  -> bin [0.5, 1]
            [0.7, 0.2, 0.1],  # wrong, 0.7             -> bin [0.5, 1]
            [0.4, 0.3, 0.3],  # right, 0.4             -> bin [0, 0.5)
            [0.2, 0.45, 0.35],  # wrong, 0.45          -> bin [0, 0.5)
        ]
    )
    y = np.array([0, 1, 0, 2])
    # high bin: accuracy 1/2, confidence 0.8; low bin: accuracy 1/2, confidence 0.425
    expected = 0.5 * abs(0.5 - 0.8) + 0.5 * abs(0.5 - 0.425)
    assert M.expected_calibration_error(probs, y, n_bins=2) == pytest.approx(expected)


def test_ece_edges():
    certain = np.array([[1.0, 0.0], [0.0, 1.0]])
    # confidence exactly 1 falls in the last bin; all right: perfectly calibrated
    assert M.expected_calibration_error(certain, np.array([0, 1])) == 0.0
    # a code no column has (-1) is always wrong
    assert M.expected_calibration_error(certain, np.array([-1, -1])) == pytest.approx(1.0)


def test_classification_metrics_by_hand():
    classes = ["a", "b"]
    proba = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    y = ["a", "b", "b", "z"]  # predicted a, b, a, a; "z" is no class
    out = M.classification_metrics(y, proba, classes, n_bins=2)
    assert out["accuracy"] == 0.5
    # F1 over a, b, z: a (P 1/3, R 1) 0.5; b (P 1, R 1/2) 2/3; z 0
    assert out["per_class_f1"] == pytest.approx({"a": 0.5, "b": 2 / 3, "z": 0.0})
    assert out["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 3)
    # NLL over the 3 cells with a known label: -log of 0.8, 0.7 and 0.4
    assert out["nll"] == pytest.approx(-np.log([0.8, 0.7, 0.4]).mean())
    codes = np.array([0, 1, 1, -1])
    assert out["ece"] == pytest.approx(M.expected_calibration_error(proba, codes, n_bins=2))
    assert (out["n"], out["n_unknown_label"]) == (4, 1)


def test_classification_metrics_edges():
    proba = np.array([[0.8, 0.2]])
    assert np.isnan(M.classification_metrics(["z"], proba, ["a", "b"])["nll"])
    with pytest.raises(ValueError, match="shape"):
        M.classification_metrics(["a", "b"], proba, ["a", "b"])

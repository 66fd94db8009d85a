"""Metrics of classifiers' predictions (cell-type annotation): accuracy, F1, calibration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence with ``n_bins`` equal-width bins.

    ``sum_b n_b / n * |accuracy_b - mean confidence_b|`` over the non-empty bins of the
    maximum probability on [0, 1] (a confidence of exactly 1 falls in the last bin); a cell
    is correct when the column of its maximum probability is ``y`` (an integer code; one no
    column has, such as -1, is always wrong).
    """
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(
    y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str], n_bins: int = 15
) -> dict[str, Any]:
    """Classification and calibration scores of predicted class probabilities.

    The prediction of a cell is ``classes[argmax(proba)]``; a cell whose true label is not
    in ``classes`` is therefore always counted wrong.

    Parameters
    ----------
    y_true
        True label of each cell ``(n,)`` (compared as strings).
    proba
        Class probabilities ``(n, k)``, columns in the order of ``classes``.
    classes
        The ``k`` class names.
    n_bins
        Bins of the expected calibration error.

    Returns
    -------
    dict
        ``accuracy``; ``macro_f1`` (sklearn's macro average over the labels present in
        ``y_true`` or in the predictions); ``per_class_f1`` (``{label: F1}`` over the same
        labels); ``ece``: :func:`expected_calibration_error` of the maximum probability
        with ``n_bins`` equal-width bins on [0, 1], over all cells; ``nll``: mean
        ``-log p(true class)`` with probabilities clipped at 1e-12, over the cells whose
        label is in ``classes`` (NaN if none); ``n`` and ``n_unknown_label`` (cells with a
        label outside ``classes``).

    Raises
    ------
    ValueError
        ``proba`` is not ``(len(y_true), len(classes))``.
    """
    from sklearn.metrics import f1_score

    y = np.asarray(y_true).astype(str)
    classes = np.asarray([str(c) for c in classes])
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (len(y), len(classes)):
        raise ValueError(f"proba has shape {proba.shape}, expected {(len(y), len(classes))}.")
    pred = classes[proba.argmax(axis=1)]
    correct = pred == y

    labels = np.union1d(y, pred)
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)

    index = {c: i for i, c in enumerate(classes)}
    codes = np.array([index.get(c, -1) for c in y])  # -1: a label no class can match
    ece = expected_calibration_error(proba, codes, n_bins=n_bins)

    known = np.array([c in index for c in y])
    if known.any():
        cols = np.array([index[c] for c in y[known]])
        p_true = proba[np.flatnonzero(known), cols]
        nll = float(-np.log(np.clip(p_true, 1e-12, None)).mean())
    else:
        nll = float("nan")
    return {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1.mean()),
        "ece": float(ece),
        "nll": nll,
        "per_class_f1": {str(c): float(v) for c, v in zip(labels, f1)},
        "n": len(y),
        "n_unknown_label": int((~known).sum()),
    }

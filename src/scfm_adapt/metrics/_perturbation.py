"""Metrics of predicted perturbation responses, exactly defined, on any data.

Every metric compares three sets of cells with the same genes, as log-normalised
expression (``log1p`` of counts scaled to 10,000 per cell, see :func:`lognorm`):

- ``ctrl``: the control cells of the context (the cells the prediction started from);
- ``true``: the real perturbed cells of that context;
- ``pred``: the predicted perturbed cells.

The *delta* of a set is its mean expression minus the mean of ``ctrl``, per gene. The *DE
genes* of a unit are ranked by the absolute true delta, ``|mean(true) - mean(ctrl)|``
(ties broken by gene order), so the ranking never depends on the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._distribution import _energy_statistic


def _mean(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        return x
    if x.shape[0] == 0:
        raise ValueError("A set of cells is empty.")
    return x.mean(0)


def de_genes(true, ctrl, k: int) -> np.ndarray:
    """Indices of the ``k`` genes with the largest ``|mean(true) - mean(ctrl)|``.

    ``true``/``ctrl`` are cells x genes (or already mean vectors).
    """
    d = np.abs(_mean(true) - _mean(ctrl))
    if k <= 0:
        raise ValueError("k must be positive.")
    return np.argsort(-d, kind="stable")[: min(k, d.size)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def pearson_delta(pred, true, ctrl, top_k: int | None = None) -> float:
    """Pearson r between predicted and true deltas over all genes, or the top-``k`` DE genes.

    ``delta = mean(cells) - mean(ctrl)`` per gene. NaN when either delta is constant.
    """
    dp, dt = _mean(pred) - _mean(ctrl), _mean(true) - _mean(ctrl)
    if top_k is not None:
        idx = de_genes(true, ctrl, top_k)
        dp, dt = dp[idx], dt[idx]
    return _pearson(dp, dt)


def r2_means(pred, true, ctrl, top_k: int = 100) -> float:
    """R² of the predicted mean expression against the true mean over the top-``k`` DE genes.

    ``1 - Σ(mean_true - mean_pred)² / Σ(mean_true - mean(mean_true))²`` over those genes
    (sklearn's ``r2_score`` on the two mean vectors); 1 is perfect, 0 is as good as
    predicting the average of the true means, and it can be negative.
    """
    idx = de_genes(true, ctrl, top_k)
    mt, mp = _mean(true)[idx], _mean(pred)[idx]
    ss_tot = ((mt - mt.mean()) ** 2).sum()
    return float(1.0 - ((mt - mp) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")


def sign_accuracy(pred, true, ctrl, top_k: int = 20) -> float:
    """Share of the top-``k`` DE genes whose predicted delta has the true delta's sign
    (a predicted delta of exactly 0 counts as wrong)."""
    idx = de_genes(true, ctrl, top_k)
    dp = (_mean(pred) - _mean(ctrl))[idx]
    dt = (_mean(true) - _mean(ctrl))[idx]
    return float(np.mean(np.sign(dp) == np.sign(dt)))


def cosine_lfc(pred, true, ctrl) -> float:
    """Cosine similarity of the predicted and true log fold-changes over all genes.

    On log-normalised data the log fold-change of a gene is its delta. NaN when either is 0.
    """
    dp, dt = _mean(pred) - _mean(ctrl), _mean(true) - _mean(ctrl)
    den = np.linalg.norm(dp) * np.linalg.norm(dt)
    return float(dp @ dt / den) if den > 0 else float("nan")


def rank_metric(pred_deltas, true_deltas) -> np.ndarray:
    """How well each prediction picks out its own perturbation among all of them.

    ``pred_deltas``/``true_deltas``: ``(n_units, n_genes)`` predicted and true deltas, row
    ``i`` of both for unit ``i``. For unit ``i``, the Euclidean distances from its
    prediction to every true delta are ranked; the score is the share of *other* units'
    true deltas that are strictly closer than its own, plus half of those at the same
    distance. 0 is perfect, about 0.5 is chance, and predictions that all look alike
    (say, one mean shift for every unit) score about 0.5 however well each matches on its
    own (PerturBench's rank metric, in spirit).

    Returns
    -------
    ``(n_units,)`` scores in ``[0, 1]``.
    """
    p, t = np.asarray(pred_deltas, float), np.asarray(true_deltas, float)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(
            f"pred and true deltas must be the same (units, genes) shape: {p.shape}, {t.shape}."
        )
    n = p.shape[0]
    if n < 2:
        raise ValueError("The rank metric needs at least two units.")
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))  # (pred i, true j)
    own = np.diag(d)
    closer = (d < own[:, None] - 1e-12).sum(1)
    ties = (np.abs(d - own[:, None]) <= 1e-12).sum(1) - 1  # minus itself
    return (closer + 0.5 * ties) / (n - 1)


def perturbation_energy_distance(pred, true, reference, n_pcs: int = 30, seed: int = 0) -> float:
    """Energy distance between predicted and true cells in PCs fitted on ``reference``.

    ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistic) with X the
    predicted and Y the true cells, both projected onto the top ``n_pcs`` principal
    components of ``reference``: log-normalised cells *outside* the unit being scored (for
    example every training cell). A PCA fitted on the control and true cells of the unit
    favours predictions that reuse the control cells, so the reference must not contain
    them. (:func:`energy_distance` instead compares two sets of counts in the PCA of the
    first.)
    """
    from sklearn.decomposition import PCA

    ref = np.asarray(reference, float)
    k = int(min(n_pcs, ref.shape[0] - 1, ref.shape[1]))
    if k < 1:
        raise ValueError("reference needs at least two cells.")
    pca = PCA(n_components=k, random_state=seed).fit(ref)
    x, y = pca.transform(np.asarray(pred, float)), pca.transform(np.asarray(true, float))
    return _energy_statistic(x, y)


METRICS = (
    "pearson_delta",
    "pearson_delta_top20",
    "r2_top100",
    "sign_acc_top20",
    "cosine_lfc",
    "energy",
)


def evaluate_unit(pred, true, ctrl, reference=None, n_pcs: int = 30) -> dict[str, float]:
    """All single-unit metrics as a dict (``energy`` only when ``reference`` is given).

    ``pearson_delta`` (all genes), ``pearson_delta_top20``, ``r2_top100``,
    ``sign_acc_top20``, ``cosine_lfc`` and ``energy`` (:func:`perturbation_energy_distance`).
    """
    out = {
        "pearson_delta": pearson_delta(pred, true, ctrl),
        "pearson_delta_top20": pearson_delta(pred, true, ctrl, top_k=20),
        "r2_top100": r2_means(pred, true, ctrl, top_k=100),
        "sign_acc_top20": sign_accuracy(pred, true, ctrl, top_k=20),
        "cosine_lfc": cosine_lfc(pred, true, ctrl),
    }
    if reference is not None:
        out["energy"] = perturbation_energy_distance(pred, true, reference, n_pcs=n_pcs)
    return out


def evaluate_predictions(
    predictions: dict[str, dict[str, np.ndarray]],
    truth: dict[str, np.ndarray],
    ctrl: dict[str, np.ndarray],
    reference: np.ndarray | None = None,
    n_pcs: int = 30,
) -> pd.DataFrame:
    """Score several methods on several units; one row per (method, unit) plus the rank.

    Parameters
    ----------
    predictions
        ``{method: {unit: predicted cells (log-normalised, cells x genes)}}``.
    truth, ctrl
        ``{unit: true perturbed cells}`` and ``{unit: control cells}``, log-normalised.
    reference
        Log-normalised cells outside every scored unit, for
        :func:`perturbation_energy_distance`.

    Returns
    -------
    DataFrame with columns ``method``, ``unit``, the metrics of :func:`evaluate_unit` and
    ``rank`` (:func:`rank_metric` among the scored units; NaN with fewer than two units).
    """
    rows = []
    units = list(truth)
    for method, preds in predictions.items():
        missing = [u for u in units if u not in preds]
        if missing:
            raise ValueError(f"Method {method!r} has no prediction for units {missing}.")
        for u in units:
            rows.append(
                {
                    "method": method,
                    "unit": u,
                    **evaluate_unit(preds[u], truth[u], ctrl[u], reference, n_pcs),
                }
            )
        if len(units) >= 2:
            pd_ = np.stack([_mean(preds[u]) - _mean(ctrl[u]) for u in units])
            td = np.stack([_mean(truth[u]) - _mean(ctrl[u]) for u in units])
            ranks = rank_metric(pd_, td)
        else:
            ranks = [np.nan] * len(units)
        for r, v in zip(rows[-len(units) :], ranks):
            r["rank"] = float(v)
    return pd.DataFrame(rows)


def summarize(scores: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean of each metric per method (rows in the order methods first appear)."""
    metrics = list(metrics or [c for c in scores.columns if c not in ("method", "unit")])
    order = list(dict.fromkeys(scores["method"]))
    return scores.groupby("method", sort=False)[metrics].mean().loc[order]

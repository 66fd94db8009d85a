"""Uncertainty of predicted perturbation responses: which units each ensemble member
leaves out, split-conformal intervals calibrated on those out-of-bag predictions, and the
spacing that scales out-of-distribution scores."""

from __future__ import annotations

import numpy as np
import torch

#: Quantile levels stored from the calibration scores (intervals at any of them).
LEVELS = np.round(np.arange(0.5, 0.995, 0.01), 2)


def out_of_bag(n_units: int, n_members: int, holdout_share: float, seed: int) -> list[list[int]]:
    """The units each ensemble member leaves out: consecutive blocks of a permutation, so
    that every unit is out of bag for some member when there are enough members."""
    order = np.random.default_rng(seed).permutation(n_units)
    n_drop = max(1, round(holdout_share * n_units)) if n_units > 1 else 0
    out = []
    for k in range(n_members):
        start = (k * n_drop) % max(n_units, 1)
        out.append(sorted({int(order[(start + j) % n_units]) for j in range(n_drop)}))
    return out


def conformal_quantiles(
    true: np.ndarray, centres: np.ndarray, spreads: np.ndarray
) -> tuple[np.ndarray, dict]:
    """Split-conformal calibration of the per-gene intervals of mean deltas.

    ``true``, ``centres`` (out-of-bag predictions) and ``spreads`` (the members'
    disagreement) are units x genes. A unit's score on a gene is its error over
    ``spread + gene_scale + 1e-3`` (``gene_scale``: the gene's RMS true delta); the
    finite-sample corrected quantile of the scores at each of :data:`LEVELS` scales the
    intervals of new predictions. Returns ``(gene_scale, calibration)``.
    """
    gene_scale = np.sqrt((true**2).mean(0))
    tau = spreads + gene_scale[None, :] + 1e-3
    scores = (np.abs(centres - true) / tau).ravel()
    n = scores.size
    q = [float(np.quantile(scores, min(1.0, np.ceil((n + 1) * lv) / n))) for lv in LEVELS]
    return gene_scale, {
        "levels": LEVELS.tolist(),
        "quantiles": q,
        "n_units": len(true),
        "oob_pearson": float(np.corrcoef(centres.ravel(), true.ravel())[0, 1]),
    }


def nn_scale(e: torch.Tensor) -> float:
    """Median distance of each row to its nearest other row (the norm of the row with one)."""
    if e.shape[0] < 2:
        return float(e.norm(dim=-1).mean().clamp(min=1e-6))
    d = torch.cdist(e, e)
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.median().clamp(min=1e-6))

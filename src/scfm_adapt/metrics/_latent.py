"""How a model uses its latent: which dimensions carry information about the cells, which
are noise, and what each token encodes.

A posterior ``q(z | x) = N(m(x), v(x))`` per cell. A dimension is *used* when its posterior
means vary across cells more than its posterior noise: the variance of the means across cells
against the mean posterior variance. A dimension whose means barely vary (below
``active_threshold``, Burda et al. 2016) is inactive: it carries no information about the
cell, only the encoder's noise, which a diffusion prior trained on samples must learn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _between_share(values: np.ndarray, groups) -> np.ndarray:
    """Share of the variance across cells of each column of ``values`` (cells × k) that
    lies between the groups' means (η²; 0 when a column is constant)."""
    groups = np.asarray(groups).astype(str)
    total = values.var(0)
    between = np.zeros(values.shape[1])
    mean = values.mean(0)
    for g in np.unique(groups):
        sel = groups == g
        between += sel.mean() * (values[sel].mean(0) - mean) ** 2
    return np.where(total > 0, between / np.maximum(total, 1e-300), 0.0)


def latent_usage(
    means: np.ndarray,
    variances: np.ndarray,
    labels=None,
    batches=None,
    active_threshold: float = 0.01,
) -> pd.DataFrame:
    """Per token: posterior noise against signal, KL to the standard normal prior, and
    (with ``labels`` / ``batches``) how much of its signal separates cell types / batches.

    Parameters
    ----------
    means, variances
        Posterior means and variances, ``(n_cells, n_tokens, token_dim)``.
    labels, batches
        Optional per-cell labels (cell types) and batches.
    active_threshold
        A dimension is active when the variance of its means across cells exceeds this.

    Returns
    -------
    One row per token and a last row ``"all"``: ``posterior_variance`` (mean over cells and
    the token's dimensions of ``v``), ``variance_of_means`` (of ``m`` across cells, mean
    over dimensions), ``signal_share`` (``variance_of_means / (variance_of_means +
    posterior_variance)``: 0 all noise, 1 sharp), ``active_dims`` (count), ``kl`` (mean
    over cells of the token's KL to ``N(0, 1)``, nats), and with labels / batches
    ``label_share`` / ``batch_share`` (the share of the variance of the token's means
    between cell types / batches, averaged over its dimensions, weighted by their variance).
    """
    m, v = np.asarray(means, np.float64), np.asarray(variances, np.float64)
    if m.ndim != 3 or m.shape != v.shape or m.shape[0] < 2:
        raise ValueError(
            "means and variances must be (n_cells, n_tokens, token_dim) with at least two "
            f"cells; got {m.shape} and {v.shape}."
        )
    if (v <= 0).any() or not (np.isfinite(m).all() and np.isfinite(v).all()):
        raise ValueError("Posterior variances must be positive and every value finite.")
    n, t, d = m.shape
    kl = 0.5 * (v + m**2 - 1.0 - np.log(v))  # (n, T, d)
    signal = m.var(0)  # (T, d)
    noise = v.mean(0)
    rows = {}
    flat_m = m.reshape(n, t * d)
    shares = {}
    for name, arg, groups in (
        ("label_share", "labels", labels),
        ("batch_share", "batches", batches),
    ):
        if groups is not None:
            if len(groups) != n:
                raise ValueError(f"{arg} has {len(groups)} entries for {n} cells.")
            shares[name] = _between_share(flat_m, groups).reshape(t, d)
    for i in [*range(t), "all"]:
        sel = slice(None) if i == "all" else i
        s, z = signal[sel], noise[sel]
        row = {
            "posterior_variance": float(z.mean()),
            "variance_of_means": float(s.mean()),
            "signal_share": float(s.mean() / (s.mean() + z.mean())),
            "active_dims": int((s > active_threshold).sum()),
            "kl": float(kl[:, sel].sum(-1).mean() if i != "all" else kl.sum((1, 2)).mean()),
        }
        for name, share in shares.items():
            w = s.ravel()
            row[name] = float((share[sel].ravel() * w).sum() / max(w.sum(), 1e-300))
        rows[f"token{i}" if i != "all" else "all"] = row
    return pd.DataFrame(rows).T

"""Every ``sfa.pl`` plot: training curves, embeddings, calibration, adaptation trade-offs,
generated vs real cells and predicted perturbation responses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .._slots import SLOTS


def _finish(fig, save: str | Path | None, show: bool | None):
    """Write ``fig`` to ``save`` (any matplotlib format, by suffix) and show it on request."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        save = Path(save)
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, bbox_inches="tight", dpi=150)
    if show is None:
        show = matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo")
    if show:
        plt.show()
    return fig


def _predicted_deltas(pred) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """``varm["scfm_delta"]`` and its interval bounds (``None`` when absent) as genes x
    requests DataFrames, from the output of ``predict_perturbation``."""
    if SLOTS.delta not in pred.varm:
        raise KeyError(
            f"pred.varm has no {SLOTS.delta!r}: pass the output of predict_perturbation."
        )

    def frame(key):
        return pd.DataFrame(pred.varm[key], index=pred.var_names) if key in pred.varm else None

    lo, hi = frame(SLOTS.delta_lower), frame(SLOTS.delta_upper)
    if lo is None or hi is None:
        lo = hi = None
    return frame(SLOTS.delta), lo, hi


def history(
    model,
    *,
    metric: str = "elbo",
    stages: Sequence[str] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Training curves of each stage: ``{metric}_train`` and, when recorded,
    ``{metric}_validation`` per epoch, one panel per stage (the prior's ELBO slot holds its
    denoising error).

    Parameters
    ----------
    model
        A trained :class:`~scfm_adapt.model.SCFM` (its ``history``).
    metric
        The metric's name without ``_train`` / ``_validation``.
    stages
        Stages to draw (``"vae"``, ``"prior"``, ...); all trained stages when ``None``.
    save
        Write the figure to this path; the format follows the suffix (``.png``, ``.pdf``,
        ``.svg`` ...).
    show
        Show the figure; ``None`` shows it only under an interactive backend.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per stage.

    Raises
    ------
    ValueError
        The model has not been trained, or a stage or metric was not recorded.
    """
    import matplotlib.pyplot as plt

    hist = getattr(model, "history", None) or {}
    if not hist:
        raise ValueError("The model has no training history: train it first (model.train()).")
    stages = list(stages or hist)
    unknown = [s for s in stages if s not in hist]
    if unknown:
        raise ValueError(f"Stages {unknown} were not trained; recorded: {list(hist)}.")
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        curves = {k: v for k, v in hist[stage].items() if k.startswith(f"{metric}_")}
        if f"{metric}_train" not in curves:
            known = sorted({k.rsplit("_", 1)[0] for k in hist[stage]})
            raise ValueError(f"No {metric!r} in the {stage!r} history; metrics: {known}.")
        for key in (f"{metric}_train", f"{metric}_validation"):
            if key in curves:
                y = curves[key].to_numpy(dtype=float).ravel()
                ax.plot(np.arange(1, len(y) + 1), y, label=key.rsplit("_", 1)[1])
        ax.set(title=f"{stage} stage", xlabel="epoch", ylabel=metric)
        ax.legend(frameon=False)
    fig.tight_layout()
    return _finish(fig, save, show)


def embedding(
    adata,
    color: str | Sequence[str],
    *,
    basis: str = SLOTS.embedding,
    n_neighbors: int = 15,
    save: str | Path | None = None,
    show: bool | None = None,
    **kwargs,
):
    """UMAP of ``adata.obsm[basis]`` coloured by ``obs`` keys, through scanpy.

    The neighbour graph and UMAP are computed on a throw-away AnnData holding only the
    embedding and the colour columns: ``adata`` is not changed.

    Parameters
    ----------
    adata
        AnnData with ``obsm[basis]`` (e.g. from :func:`scfm_adapt.tl.embed`).
    color
        ``obs`` columns or genes (``var_names``) to colour by, one panel each.
    basis
        The ``obsm`` key of the embedding.
    n_neighbors
        Neighbours of the graph the UMAP is computed on.
    **kwargs
        Passed to :func:`scanpy.pl.umap`.
    save
        Write the figure to this path; the format follows the suffix (``.png``, ``.pdf``,
        ``.svg`` ...).
    show
        Show the figure; ``None`` shows it only under an interactive backend.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    KeyError
        ``basis`` or a colour is missing.
    """
    import anndata as ad
    import scanpy as sc

    colors = [color] if isinstance(color, str) else list(color)
    if basis not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {basis!r} (has {list(adata.obsm)}); run "
            "sfa.tl.embed(adata, model) first or pass basis=."
        )
    missing = [c for c in colors if c not in adata.obs and c not in adata.var_names]
    if missing:
        raise KeyError(f"{missing} are neither obs columns nor genes of adata.")
    obs = pd.DataFrame({c: adata.obs[c] for c in colors if c in adata.obs}, index=adata.obs_names)
    tmp = ad.AnnData(obs=obs, obsm={basis: np.asarray(adata.obsm[basis])})
    genes = [c for c in colors if c not in adata.obs]
    if genes:  # gene colours: only those columns of X come along
        x = adata[:, genes].X
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        tmp = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes), obsm=dict(tmp.obsm))
    sc.pp.neighbors(tmp, use_rep=basis, n_neighbors=n_neighbors)
    sc.tl.umap(tmp)
    fig = sc.pl.umap(tmp, color=colors, show=False, return_fig=True, **kwargs)
    return _finish(fig, save, show)


def calibration(
    adata,
    labels_key: str,
    *,
    pred_key: str = SLOTS.label,
    confidence_key: str = f"{SLOTS.label}_confidence",
    n_bins: int = 10,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Reliability diagram of an annotation: accuracy against confidence in ``n_bins`` equal
    bins, the cell counts per bin, and the expected calibration error (ECE) in the title.

    Parameters
    ----------
    adata
        AnnData whose ``obs`` holds the true labels and what :func:`scfm_adapt.tl.annotate`
        wrote.
    labels_key
        ``obs`` column of the true labels.
    pred_key, confidence_key
        ``obs`` columns of the predicted label and its calibrated confidence.
    n_bins
        Equal-width confidence bins.
    save
        Write the figure to this path; the format follows the suffix (``.png``, ``.pdf``,
        ``.svg`` ...).
    show
        Show the figure; ``None`` shows it only under an interactive backend.

    Returns
    -------
    matplotlib.figure.Figure
        The ECE is also in ``fig.ece_``.

    Raises
    ------
    KeyError
        A column is missing.
    """
    import matplotlib.pyplot as plt

    for key in (labels_key, pred_key, confidence_key):
        if key not in adata.obs:
            raise KeyError(
                f"{key!r} is not a column of adata.obs; run sfa.tl.annotate first and pass "
                "the column of true labels as labels_key."
            )
    conf = adata.obs[confidence_key].to_numpy(dtype=float)
    correct = (
        adata.obs[pred_key].astype(str).to_numpy() == adata.obs[labels_key].astype(str).to_numpy()
    )
    if len(conf) == 0:
        raise ValueError("adata has no cells.")
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    acc = np.bincount(idx, weights=correct, minlength=n_bins) / np.maximum(count, 1)
    mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / np.maximum(count, 1)
    ece = float(np.sum(count / count.sum() * np.abs(acc - mean_conf)))
    fig, (ax, axc) = plt.subplots(
        2, 1, figsize=(4, 4.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    centers = (edges[:-1] + edges[1:]) / 2
    used = count > 0
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect")
    ax.bar(centers[used], acc[used], width=1 / n_bins, alpha=0.7, edgecolor="k", label="accuracy")
    ax.set(ylabel="accuracy", title=f"ECE {ece:.3f} (n={len(conf):,})", ylim=(0, 1))
    ax.legend(frameon=False, loc="upper left")
    axc.bar(centers, count, width=1 / n_bins, color="grey", edgecolor="k")
    axc.set(xlabel="confidence", ylabel="cells", xlim=(0, 1))
    fig.tight_layout()
    fig.ece_ = ece
    return _finish(fig, save, show)


def perturbation_delta(
    pred,
    true: pd.Series | np.ndarray,
    *,
    label: str | None = None,
    genes: Sequence[str] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Predicted against observed mean change per gene, with the prediction's intervals.

    Parameters
    ----------
    pred
        The AnnData from ``PerturbationModel.predict_perturbation``: ``varm["scfm_delta"]``
        and, when present, ``varm["scfm_delta_lower"]`` / ``["scfm_delta_upper"]``.
    true
        Observed mean change per gene, on the same scale (a Series indexed by gene, or an
        array in ``pred.var_names`` order).
    label
        Column of ``varm["scfm_delta"]`` (a request); the first when ``None``.
    genes
        Plot only these genes (e.g. the top responders).
    save
        Write the figure to this path; the format follows the suffix (``.png``, ``.pdf``,
        ``.svg`` ...).
    show
        Show the figure; ``None`` shows it only under an interactive backend.

    Returns
    -------
    matplotlib.figure.Figure
        The Pearson r of the drawn genes is also in ``fig.pearson_r_``.

    Raises
    ------
    KeyError
        No ``varm["scfm_delta"]``, an unknown request, or genes missing from either input.
    """
    import matplotlib.pyplot as plt

    delta, lower, upper = _predicted_deltas(pred)
    label = delta.columns[0] if label is None else label
    if label not in delta.columns:
        raise KeyError(f"{label!r} is not a predicted request; choose from {list(delta.columns)}.")
    true = true if isinstance(true, pd.Series) else pd.Series(np.asarray(true), index=delta.index)
    genes = list(delta.index) if genes is None else list(genes)
    missing = [g for g in genes if g not in delta.index or g not in true.index]
    if missing:
        raise KeyError(f"Genes missing from the prediction or the observed deltas: {missing[:5]}")
    x = true.loc[genes].to_numpy(dtype=float)
    y = delta.loc[genes, label].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 4))
    if lower is not None:
        lo = lower.loc[genes, label].to_numpy(float)
        hi = upper.loc[genes, label].to_numpy(float)
        err = np.vstack([y - lo, hi - y]).clip(min=0)
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor="grey", alpha=0.4, lw=0.8)
    ax.scatter(x, y, s=8, zorder=3)
    lim = [min(x.min(), y.min()), max(x.max(), y.max())]
    ax.plot(lim, lim, ls="--", c="grey", lw=1)
    r = float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 else float("nan")
    ax.set(
        xlabel="observed mean change", ylabel="predicted mean change", title=f"{label}: r={r:.3f}"
    )
    fig.tight_layout()
    fig.pearson_r_ = r
    return _finish(fig, save, show)


def perturbation_heatmap(
    pred,
    *,
    n_genes: int = 20,
    labels: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Heatmap of the most responsive predicted genes (rows) across perturbations (columns).

    Genes are ranked by their largest absolute predicted mean change over the chosen
    requests; the colour is the predicted change (diverging, centred on 0). A dot marks a
    change whose interval (``varm["scfm_delta_lower"/"_upper"]``) excludes 0. The genes drawn
    are in ``fig.genes_``.

    Parameters
    ----------
    pred
        The AnnData from ``PerturbationModel.predict_perturbation``.
    n_genes
        How many top genes to draw (ignored when ``genes`` is given).
    labels
        Requests (columns of ``varm["scfm_delta"]``) to draw; all when ``None``.
    genes
        Draw these genes instead of the top ones.
    save
        Write the figure to this path; the format follows the suffix (``.png``, ``.pdf``,
        ``.svg`` ...).
    show
        Show the figure; ``None`` shows it only under an interactive backend.

    Returns
    -------
    matplotlib.figure.Figure
        The genes drawn are also in ``fig.genes_``.

    Raises
    ------
    KeyError
        No ``varm["scfm_delta"]``, an unknown request, or an unknown gene.
    """
    import matplotlib.pyplot as plt

    delta, lower, upper = _predicted_deltas(pred)
    labels = list(delta.columns) if labels is None else list(labels)
    unknown = [lab for lab in labels if lab not in delta.columns]
    if unknown or not labels:
        raise KeyError(
            f"Requests {unknown} were not predicted (or none chosen); "
            f"choose from {list(delta.columns)}."
        )
    delta = delta[labels]
    if genes is None:
        if n_genes < 1:
            raise ValueError(f"n_genes must be at least 1, got {n_genes}.")
        genes = delta.abs().max(axis=1).nlargest(min(n_genes, len(delta))).index.tolist()
    else:
        genes = list(genes)
        missing = [g for g in genes if g not in delta.index]
        if missing or not genes:
            raise KeyError(f"Genes not in the prediction (or none given): {missing[:5]}")
    values = delta.loc[genes].to_numpy(dtype=float)
    vmax = float(np.nanmax(np.abs(values))) or 1.0
    fig, ax = plt.subplots(
        figsize=(1.2 + 0.45 * len(labels), 1.0 + 0.22 * len(genes)), layout="constrained"
    )
    im = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    if lower is not None:
        lo = lower.loc[genes, labels].to_numpy(float)
        hi = upper.loc[genes, labels].to_numpy(float)
        sure = (lo > 0) | (hi < 0)
        rows, cols = np.nonzero(sure)
        ax.scatter(cols, rows, s=6, c="k", marker="o", label="interval excludes 0")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(genes)), genes)
    ax.set_title("predicted mean change")
    fig.colorbar(im, ax=ax, shrink=0.6, label="Δ log-normalised expression")
    fig.genes_ = genes
    return _finish(fig, save, show)


def generated_vs_real(
    real,
    generated,
    *,
    color: str | None = None,
    layer: str | None = None,
    n_pcs: int = 30,
    n_neighbors: int = 15,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Generated and real cells on one UMAP.

    Both sets are log-normalised (counts in ``X`` or ``layer``), projected on the PCA of the
    *real* cells only (so generated cells cannot pull the axes towards themselves), and laid
    out together by UMAP. The first panel colours by source, the second (when ``color``
    names an obs column present in both) by that column. Neither input is changed.

    Parameters
    ----------
    real, generated
        AnnData objects with the same genes in the same order (counts in ``X`` or
        ``layer``), e.g. held-out cells and the output of ``model.generate``.
    color
        An ``obs`` column of both to colour the second panel by.
    layer
        Layer holding the counts (``X`` when ``None``).
    n_pcs, n_neighbors
        Principal components (fitted on ``real``) and neighbours of the UMAP graph.
    save
        Write the figure to this path; the format follows the suffix (``.png``, ``.pdf``,
        ``.svg`` ...).
    show
        Show the figure; ``None`` shows it only under an interactive backend.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        Different genes, or an empty input.
    KeyError
        ``color`` is not a column of both.
    """
    import anndata as ad
    import scanpy as sc

    from ..metrics import embed_pair

    if color is not None and (color not in real.obs or color not in generated.obs):
        raise KeyError(f"{color!r} must be an obs column of both real and generated.")
    # the same yardstick as sfa.metrics: PCA of the real cells' log-normalised counts
    pr, pg = embed_pair(real, generated, n_pcs=n_pcs, layer=layer, fit_on="real")
    pcs = np.vstack([pr, pg]).astype(np.float32)
    source = ["real"] * real.n_obs + ["generated"] * generated.n_obs
    obs = pd.DataFrame({"source": pd.Categorical(source, categories=["real", "generated"])})
    if color is not None:
        obs[color] = pd.Categorical(
            np.concatenate([real.obs[color].astype(str), generated.obs[color].astype(str)])
        )
    obs.index = obs.index.astype(str)
    tmp = ad.AnnData(obs=obs, obsm={"X_pca": pcs})
    sc.pp.neighbors(tmp, use_rep="X_pca", n_neighbors=min(n_neighbors, tmp.n_obs - 1))
    sc.tl.umap(tmp)
    colors = ["source"] + ([color] if color is not None else [])
    fig = sc.pl.umap(tmp, color=colors, show=False, return_fig=True)
    return _finish(fig, save, show)


def adaptation(
    results: pd.DataFrame,
    *,
    metric: str = "accuracy",
    params_key: str = "trainable_params",
    baselines: Sequence[str] = (),
    save: str | Path | None = None,
    show: bool | None = None,
):
    """Quality against trainable parameters, one point per adaptation strategy.

    ``results`` has one row per method (the index names it) with the columns ``params_key``
    and ``metric``, e.g. the table ``benchmarks/annotation.py`` prints, or one built from
    :meth:`~scfm_adapt.model.SCFM.parameter_report` and your own evaluation. Rows named in
    ``baselines`` are drawn as grey squares and a dashed line at their score, so a strategy
    that does not beat them is visible at once.

    Parameters
    ----------
    results
        One row per method (index: its name).
    metric
        Column drawn on the y axis (e.g. ``"accuracy"``, ``"macro-F1"``).
    params_key
        Column of trainable parameter counts, drawn on a log x axis.
    baselines
        Rows that are baselines rather than adaptation strategies.
    save
        Write the figure to this path; the format follows the suffix (``.png``, ``.pdf``,
        ``.svg`` ...).
    show
        Show the figure; ``None`` shows it only under an interactive backend.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    KeyError
        A column or a baseline row is missing.
    ValueError
        No rows, or parameter counts that are not positive.
    """
    import matplotlib.pyplot as plt

    for key in (metric, params_key):
        if key not in results.columns:
            raise KeyError(f"results has no column {key!r}; columns: {list(results.columns)}.")
    missing = [b for b in baselines if b not in results.index]
    if missing:
        raise KeyError(f"Baselines {missing} are not rows of results ({list(results.index)}).")
    if results.empty:
        raise ValueError("results has no rows.")
    params = results[params_key].to_numpy(dtype=float)
    if (params <= 0).any() or np.isnan(params).any():
        raise ValueError(f"{params_key!r} must be positive numbers (it is drawn on a log axis).")
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    is_base = results.index.isin(list(baselines))
    for name, row, base in zip(results.index, results.itertuples(), is_base):
        x, y = float(getattr(row, params_key)), float(getattr(row, metric))
        ax.scatter(x, y, marker="s" if base else "o", c="grey" if base else "C0", zorder=3)
        ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        if base:
            ax.axhline(y, ls="--", c="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=metric)
    return _finish(fig, save, show)


def pathway_attributions(
    adata,
    *,
    key: str = SLOTS.pathways,
    groups: Sequence[str] | None = None,
    n_top: int | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
):
    """The top pathways of each group, from ``sfa.tl.pathway_attributions(..., groupby=)``.

    One panel per group: horizontal bars of the mean signed attribution of its strongest
    pathways (by mean absolute attribution), strongest at the top, each labelled with its
    share of the group's total.

    Parameters
    ----------
    adata
        AnnData with ``uns[key]["top"]``.
    key
        The ``key_added`` of ``sfa.tl.pathway_attributions``.
    groups
        Draw only these groups (default: all, in sorted order).
    n_top
        Pathways per panel (default: as many as were computed).
    save, show
        As for every ``sfa.pl`` plot.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    KeyError
        No ``uns[key]["top"]`` (run ``sfa.tl.pathway_attributions`` with ``groupby=``), or
        an unknown group.
    """
    import matplotlib.pyplot as plt

    entry = adata.uns.get(key, {})
    if "top" not in entry:
        raise KeyError(
            f"adata.uns has no {key!r} with a 'top' table: run "
            f"sfa.tl.pathway_attributions(adata, model, groupby=..., key_added={key!r}) first."
        )
    top = pd.DataFrame(entry["top"])
    known = sorted(top["group"].astype(str).unique())
    groups = known if groups is None else [str(g) for g in groups]
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise KeyError(f"Groups {unknown} have no attributions; choose from {known}.")
    n = len(groups)
    fig, axes = plt.subplots(n, 1, figsize=(6, 0.4 + 0.35 * (n_top or 5) * n), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        t = top[top["group"].astype(str) == group].sort_values("rank")
        t = t.head(n_top) if n_top else t
        y = np.arange(len(t))[::-1]
        colors = ["#c0392b" if v > 0 else "#2e86c1" for v in t["mean"]]
        ax.barh(y, t["mean"], color=colors)
        ax.set_yticks(y, [f"{p} ({s:.0%})" for p, s in zip(t["pathway"], t["share"])], fontsize=8)
        ax.axvline(0, c="grey", lw=0.8)
        ax.set_title(f"{group} (n={int(t['n_cells'].iloc[0])})", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("mean attribution (share of the group's mean |attribution|)")
    fig.tight_layout()
    return _finish(fig, save, show)

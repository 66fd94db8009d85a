"""How close two sets of cells are as distributions (generated vs real cells).

Every public function takes two AnnData objects (or cells × genes count matrices) with the
same genes: ``real`` and ``generated``. Distribution distances are computed on a shared
representation: counts normalised to 10,000 per cell, ``log1p`` (:func:`lognorm`), then a
PCA *fit on the real cells only* (so the yardstick does not move with the generator). The
``*_embedded`` functions take the two point sets themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._expression import lognorm

Cells = AnnData | np.ndarray | sparse.spmatrix


def _matrix(data: Cells, layer: str | None) -> np.ndarray | sparse.csr_matrix:
    if isinstance(data, AnnData):
        x = data.X if layer is None else data.layers[layer]
    else:
        if layer is not None:
            raise ValueError("layer= only applies to AnnData inputs.")
        x = data
    x = sparse.csr_matrix(x, dtype=np.float64) if sparse.issparse(x) else np.asarray(x, float)
    if x.shape[0] == 0:
        raise ValueError("An input holds no cells.")
    return x


def _check_pair(real: Cells, generated: Cells, layer: str | None):
    if isinstance(real, AnnData) and isinstance(generated, AnnData):
        if not real.var_names.equals(generated.var_names):
            raise ValueError(
                "real and generated have different genes (or gene order): subset both to "
                "the same var_names, e.g. generated[:, real.var_names]."
            )
    xr, xg = _matrix(real, layer), _matrix(generated, layer)
    if xr.shape[1] != xg.shape[1]:
        raise ValueError(f"real has {xr.shape[1]} genes, generated {xg.shape[1]}.")
    return xr, xg


def embed_pair(
    real: Cells,
    generated: Cells,
    n_pcs: int = 30,
    layer: str | None = None,
    seed: int = 0,
    fit_on: str = "real",
) -> tuple[np.ndarray, np.ndarray]:
    """Both sets in the top ``n_pcs`` principal components of the log-normalised cells.

    ``fit_on="real"`` fits the PCA on the real cells only (a fixed yardstick, used by the
    distances); ``"both"`` on equal numbers of real and generated cells (symmetric, used
    by the classifier test: a PCA fit on one small set spreads that set along its own
    noise directions and shrinks the other towards the centre, which a kNN classifier
    then exploits even between two real samples).
    """
    xr, xg = _check_pair(real, generated, layer)
    return _pca_pair(lognorm(xr), lognorm(xg), n_pcs, seed, fit_on)


def _pca_pair(
    lr: np.ndarray, lg: np.ndarray, n_pcs: int, seed: int, fit_on: str
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`embed_pair` on log-normalised matrices."""
    from sklearn.decomposition import PCA

    if fit_on not in ("real", "both"):
        raise ValueError(f"fit_on={fit_on!r}; use 'real' or 'both'.")
    if fit_on == "both":
        rng = np.random.default_rng(seed)
        n = min(len(lr), len(lg))
        fit = np.concatenate([_subsample(lr, n, rng), _subsample(lg, n, rng)])
    else:
        fit = lr
    n_pcs = int(min(n_pcs, fit.shape[0] - 1, fit.shape[1]))
    if n_pcs < 1:
        raise ValueError("Need at least 2 real cells for a PCA.")
    pca = PCA(n_pcs, random_state=seed).fit(fit)
    return pca.transform(lr), pca.transform(lg)


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def mmd_embedded(
    a: np.ndarray, b: np.ndarray, bandwidth: float | None = None, max_cells: int = 2000, seed=0
) -> float:
    """Unbiased squared MMD with an RBF kernel ``exp(-d^2 / (2 h^2))`` between two point
    sets; ``h`` defaults to the median pairwise distance of the pooled points."""
    rng = np.random.default_rng(seed)
    a, b = _subsample(a, max_cells, rng), _subsample(b, max_cells, rng)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("MMD needs at least 2 cells in each set.")
    if bandwidth is None:
        pooled = np.concatenate([a, b])
        d = _sq_dists(pooled, pooled)[np.triu_indices(len(pooled), 1)]
        bandwidth = float(np.sqrt(np.median(d))) or 1.0
    gamma = 1.0 / (2 * bandwidth**2)
    kaa, kbb, kab = (np.exp(-gamma * _sq_dists(p, q)) for p, q in ((a, a), (b, b), (a, b)))
    n, m = len(a), len(b)
    term_a = (kaa.sum() - np.trace(kaa)) / (n * (n - 1))
    term_b = (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
    return float(term_a + term_b - 2 * kab.mean())


def _mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of a row of ``a`` and a row of ``b``, each
    from the coordinate differences themselves (exactly 0 between a point and itself)."""
    from scipy.spatial.distance import cdist

    return float(cdist(np.asarray(a, float), np.asarray(b, float)).mean())


def _energy_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Energy distance ``2 E|a-b| - E|a-a'| - E|b-b'|`` between two point sets, every pair
    counted (the V-statistic: 0 for identical sets); the core of both energy distances."""
    return 2 * _mean_distance(a, b) - _mean_distance(a, a) - _mean_distance(b, b)


def energy_embedded(a: np.ndarray, b: np.ndarray, max_cells: int = 2000, seed=0) -> float:
    """Energy distance ``2 E|a-b| - E|a-a'| - E|b-b'|`` between two point sets (the
    V-statistic: non-negative, and exactly 0 for identical sets), on at most ``max_cells``
    points of each."""
    rng = np.random.default_rng(seed)
    a, b = _subsample(a, max_cells, rng), _subsample(b, max_cells, rng)
    return float(max(_energy_statistic(a, b), 0.0))


def mmd(
    real: Cells,
    generated: Cells,
    *,
    n_pcs: int = 30,
    layer: str | None = None,
    bandwidth: float | None = None,
    max_cells: int = 2000,
    seed: int = 0,
) -> float:
    """Squared maximum mean discrepancy (RBF kernel, median-heuristic bandwidth) in the PCA
    of the real cells. About 0 for sets from one distribution, larger the more they differ.

    Parameters
    ----------
    real, generated
        AnnData objects (counts in ``X`` or ``layer``) or count matrices, same genes.
    n_pcs
        Principal components of the real cells' log-normalised expression.
    bandwidth
        RBF length scale; ``None`` uses the median pairwise distance.
    max_cells
        Cells drawn from each set (the kernel matrices are quadratic in it).
    """
    a, b = embed_pair(real, generated, n_pcs, layer, seed)
    return mmd_embedded(a, b, bandwidth, max_cells, seed)


def energy_distance(
    real: Cells,
    generated: Cells,
    *,
    n_pcs: int = 30,
    layer: str | None = None,
    max_cells: int = 2000,
    seed: int = 0,
) -> float:
    """Energy distance (Székely) in the PCA of the real cells; 0 for equal distributions.

    Compares two sets of *counts*; to score predicted perturbation responses against a
    fixed reference PCA use :func:`perturbation_energy_distance`.
    """
    a, b = embed_pair(real, generated, n_pcs, layer, seed)
    return energy_embedded(a, b, max_cells, seed)


def precision_recall_embedded(
    a: np.ndarray, b: np.ndarray, k: int = 5, max_cells: int = 5000, seed: int = 0
) -> dict[str, float]:
    """Precision, recall, density and coverage of ``b`` (generated) against ``a`` (real)
    (Naeem et al. 2020), from k-nearest-neighbour balls.

    Each real point's ball reaches its ``k``-th nearest other real point; each generated
    point's ball its ``k``-th nearest other generated point. *Precision*: share of
    generated points inside some real ball (realism). *Recall*: share of real points inside
    some generated ball (diversity). *Density*: the real balls a generated point falls in,
    averaged over the generated points and divided by ``k`` (about 1 for two samples of
    one distribution; unbounded). *Coverage*: share of real points whose ball holds a
    generated point. Identical sets give precision, recall and coverage 1 and a density of
    at least ``(k + 1) / k`` (each point also lies in its own ball).
    """
    rng = np.random.default_rng(seed)
    a, b = _subsample(a, max_cells, rng), _subsample(b, max_cells, rng)
    if min(len(a), len(b)) <= k:
        raise ValueError(f"precision/recall need more than k={k} cells in each set.")

    def radii(x: np.ndarray) -> np.ndarray:  # distance to the k-th nearest other point
        d = np.sqrt(_sq_dists(x, x))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    ra, rb = radii(a), radii(b)
    d_ab = np.sqrt(_sq_dists(a, b))  # (real, generated)
    inside = d_ab <= ra[:, None]  # generated j inside real i's ball
    return {
        "precision": float(inside.any(0).mean()),
        "recall": float((d_ab <= rb[None, :]).any(1).mean()),
        "density": float(inside.sum(0).mean() / k),
        "coverage": float(inside.any(1).mean()),
    }


def wasserstein_embedded(a: np.ndarray, b: np.ndarray, max_cells: int = 1000, seed=0) -> float:
    """Exact 2-Wasserstein distance between two point sets of equal size (the larger set
    is subsampled to the smaller one's, at most ``max_cells`` each): the square root of
    the mean squared distance of the optimal one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    n = min(len(a), len(b), max_cells)
    if n < 1:
        raise ValueError("The Wasserstein distance needs cells in both sets.")
    from scipy.spatial.distance import cdist

    a, b = _subsample(a, n, rng), _subsample(b, n, rng)
    cost = cdist(np.asarray(a, float), np.asarray(b, float), "sqeuclidean")  # exact zeros
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def precision_recall(
    real: Cells,
    generated: Cells,
    *,
    n_pcs: int = 30,
    layer: str | None = None,
    k: int = 5,
    max_cells: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Precision, recall, density and coverage (:func:`precision_recall_embedded`) in the
    PCA of the real cells' log-normalised expression."""
    a, b = embed_pair(real, generated, n_pcs, layer, seed)
    return precision_recall_embedded(a, b, k, max_cells, seed)


def wasserstein_distance(
    real: Cells,
    generated: Cells,
    *,
    n_pcs: int = 30,
    layer: str | None = None,
    max_cells: int = 1000,
    seed: int = 0,
) -> float:
    """2-Wasserstein distance (:func:`wasserstein_embedded`) in the PCA of the real cells'
    log-normalised expression; 0 for identical sets."""
    a, b = embed_pair(real, generated, n_pcs, layer, seed)
    return wasserstein_embedded(a, b, max_cells, seed)


def label_fidelity_embedded(
    a: np.ndarray, labels_a, b: np.ndarray, labels_b, max_iter: int = 1000
) -> pd.Series:
    """How often generated cells are recognised as the label they were generated for.

    A logistic regression fitted on the real points ``a`` and their labels (standardised
    coordinates) labels the generated points ``b``; returns, per requested label of
    ``labels_b``, the share that got it, with the share over all generated points under
    ``"all"``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ya, yb = np.asarray(labels_a).astype(str), np.asarray(labels_b).astype(str)
    if len(np.unique(ya)) < 2:
        raise ValueError("Label fidelity needs real cells of at least two labels.")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    hit = clf.fit(a, ya).predict(b) == yb
    out = {str(g): float(hit[yb == g].mean()) for g in sorted(set(yb))}
    return pd.Series({**out, "all": float(hit.mean())}, name="label_fidelity")


def label_fidelity(
    real: AnnData,
    generated: AnnData,
    labels_key: str,
    *,
    n_pcs: int = 30,
    layer: str | None = None,
    seed: int = 0,
) -> pd.Series:
    """Label fidelity (:func:`label_fidelity_embedded`) in the PCA of the real cells:
    ``obs[labels_key]`` of the real cells trains the classifier, that of the generated
    cells names what each was generated as."""
    for data, what in ((real, "real"), (generated, "generated")):
        if labels_key not in data.obs:
            raise KeyError(f"{labels_key!r} is not a column of the {what} cells' obs.")
    a, b = embed_pair(real, generated, n_pcs, layer, seed)
    return label_fidelity_embedded(a, real.obs[labels_key], b, generated.obs[labels_key])


def gene_statistics(real: Cells, generated: Cells, *, layer: str | None = None) -> dict[str, float]:
    """Pearson correlation, across genes, of the real and generated per-gene means and
    variances (of log-normalised expression) and zero fractions (of counts)."""
    xr, xg = _check_pair(real, generated, layer)
    return _gene_stats(xr, xg, lognorm(xr), lognorm(xg))


def _gene_stats(xr, xg, lr: np.ndarray, lg: np.ndarray) -> dict[str, float]:
    """:func:`gene_statistics` from counts and their log-normalised matrices."""
    out = {}
    for name, fr, fg in (
        ("mean", lr.mean(0), lg.mean(0)),
        ("variance", lr.var(0), lg.var(0)),
        ("zero_fraction", _zero_fraction(xr), _zero_fraction(xg)),
    ):
        ok = np.isfinite(fr) & np.isfinite(fg)
        if ok.sum() < 2 or np.std(fr[ok]) == 0 or np.std(fg[ok]) == 0:
            out[f"{name}_pearson"] = float("nan")
        else:
            out[f"{name}_pearson"] = float(np.corrcoef(fr[ok], fg[ok])[0, 1])
    return out


def _zero_fraction(x) -> np.ndarray:
    if sparse.issparse(x):
        return 1.0 - np.asarray((x != 0).sum(0)).ravel() / x.shape[0]
    return (np.asarray(x) == 0).mean(0)


def classifier_two_sample_test_embedded(
    a: np.ndarray,
    b: np.ndarray,
    classifier: str = "knn",
    n_neighbors: int = 15,
    cv: int = 5,
    max_cells: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Cross-validated accuracy and AUC of a classifier telling ``a`` from ``b`` (the
    larger set is subsampled to the smaller one's size, so chance is 0.5)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(a), len(b), max_cells)
    if n < 2 * cv:
        raise ValueError(f"The two-sample test needs at least {2 * cv} cells in each set.")
    a, b = _subsample(a, n, rng), _subsample(b, n, rng)
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(n), np.ones(n)]
    if classifier == "knn":
        clf = KNeighborsClassifier(n_neighbors=min(n_neighbors, n - 1))
    elif classifier == "logistic":
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    else:
        raise ValueError(f"classifier={classifier!r}; use 'knn' or 'logistic'.")
    folds = StratifiedKFold(cv, shuffle=True, random_state=seed)
    proba = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]
    # Ties at 0.5 (a kNN vote split evenly) count as half right.
    acc = np.where(proba == 0.5, 0.5, (proba > 0.5) == y).mean()
    return {"accuracy": float(acc), "auc": float(roc_auc_score(y, proba)), "n_per_set": int(n)}


def classifier_two_sample_test(
    real: Cells,
    generated: Cells,
    *,
    classifier: str = "knn",
    n_pcs: int = 30,
    n_neighbors: int = 15,
    cv: int = 5,
    layer: str | None = None,
    max_cells: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Classifier two-sample test (C2ST) in a PCA fit on both sets (equal numbers).

    A classifier (``"knn"`` with ``n_neighbors``, or ``"logistic"``) learns to tell real
    from generated cells; its ``cv``-fold cross-validated accuracy and AUC are 0.5 when the
    sets are indistinguishable and 1.0 when they separate perfectly. The larger set is
    subsampled to the smaller one's size.

    Returns
    -------
    ``{"accuracy", "auc", "n_per_set"}``
    """
    a, b = embed_pair(real, generated, n_pcs, layer, seed, fit_on="both")
    return classifier_two_sample_test_embedded(a, b, classifier, n_neighbors, cv, max_cells, seed)


#: Folds of :func:`evaluate_generation`'s classifier two-sample tests, and the ``k`` of its
#: precision / recall / density / coverage.
C2ST_FOLDS, PRDC_K = 5, 5


def evaluate_generation(
    real: AnnData,
    generated: AnnData,
    *,
    groupby: str | None = None,
    groups: Sequence[str] | None = None,
    n_pcs: int = 30,
    layer: str | None = None,
    min_cells: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Every metric, pooled and (with ``groupby``, an ``obs`` column of both) per group.

    One row per set compared: ``"pooled"``, then each group with at least ``min_cells``
    real and generated cells, then ``"macro"`` (mean over those groups). Per-group rows
    use a PCA of that group's cells; distances use a PCA fit on the real cells, the
    classifier tests one fit on both sets. Columns: ``mmd``, ``energy``, ``wasserstein``,
    ``precision``, ``recall``, ``density``, ``coverage``, ``c2st_knn_accuracy``,
    ``c2st_knn_auc``, ``c2st_logistic_auc``, ``mean_pearson``, ``variance_pearson``,
    ``zero_fraction_pearson``, ``n_real``, ``n_generated`` (NaN where a set is too small
    for the metric: MMD needs 2 cells, precision and its kin 6, the two-sample tests 10);
    with ``groupby`` also
    ``label_fidelity`` (:func:`label_fidelity_embedded`, a classifier fitted on every real
    cell in the pooled PCA: pooled, the share of all generated cells recognised as their
    group; per group, the share of that group's).
    """

    def row(r, g) -> dict:
        xr, xg = _check_pair(r, g, layer)
        lr, lg = lognorm(xr), lognorm(xg)  # once for every metric of the row
        a, b = _pca_pair(lr, lg, n_pcs, seed, "real")
        ca, cb = _pca_pair(lr, lg, n_pcs, seed, "both")
        n = min(len(a), len(b))
        # A set too small for a metric gets NaN there, not an error: the other figures of
        # a small pooled set still count.
        nan_c2st = {"accuracy": np.nan, "auc": np.nan}
        knn, logit = nan_c2st, nan_c2st
        if n >= 2 * C2ST_FOLDS:
            knn = classifier_two_sample_test_embedded(ca, cb, "knn", cv=C2ST_FOLDS, seed=seed)
            logit = classifier_two_sample_test_embedded(
                ca, cb, "logistic", cv=C2ST_FOLDS, seed=seed
            )
        prdc = dict.fromkeys(("precision", "recall", "density", "coverage"), np.nan)
        if n > PRDC_K:
            prdc = precision_recall_embedded(a, b, k=PRDC_K, seed=seed)
        return {
            "mmd": mmd_embedded(a, b, seed=seed) if n >= 2 else np.nan,
            "energy": energy_embedded(a, b, seed=seed),
            "wasserstein": wasserstein_embedded(a, b, seed=seed),
            **prdc,
            "c2st_knn_accuracy": knn["accuracy"],
            "c2st_knn_auc": knn["auc"],
            "c2st_logistic_auc": logit["auc"],
            **_gene_stats(xr, xg, lr, lg),
            "n_real": r.n_obs,
            "n_generated": g.n_obs,
        }

    rows = {"pooled": row(real, generated)}
    if groupby is not None:
        for data, what in ((real, "real"), (generated, "generated")):
            if groupby not in data.obs:
                raise KeyError(f"{groupby!r} is not a column of the {what} cells' obs.")
        rv, gv = real.obs[groupby].astype(str), generated.obs[groupby].astype(str)
        names = groups if groups is not None else sorted(set(rv) & set(gv))
        fidelity = None
        if rv.nunique() > 1:
            a, b = embed_pair(real, generated, n_pcs, layer, seed)
            fidelity = label_fidelity_embedded(a, rv, b, gv)
            rows["pooled"]["label_fidelity"] = fidelity["all"]
        per = {}
        for name in names:
            r, g = real[(rv == name).to_numpy()], generated[(gv == name).to_numpy()]
            if min(r.n_obs, g.n_obs) >= min_cells:
                per[str(name)] = row(r, g)
                if fidelity is not None:
                    per[str(name)]["label_fidelity"] = fidelity.get(str(name), np.nan)
        rows.update(per)
        if per:
            frame = pd.DataFrame(per).T
            rows["macro"] = frame.mean().to_dict()
    return pd.DataFrame(rows).T

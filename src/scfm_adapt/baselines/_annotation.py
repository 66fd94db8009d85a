"""Cell-type annotation baselines: train cells with labels in, test-cell probabilities out.

Each baseline takes a *train* AnnData (raw counts, labels in ``obs[labels_key]``) and a
*test* AnnData with the same genes, sees only the train cells' labels, and returns an
:class:`AnnotationResult`: class probabilities of the test cells, the classes, the fitted
parameter count, the wall time and a note.

Features are log-normalised counts (10,000 per cell, ``log1p``) of ``genes``: by default
the train cells' highly variable genes (:func:`~scfm_adapt.baselines.highly_variable_genes`).
The counts are subset to the genes first and then normalised, so library sizes are taken
over those genes. The scvi-tools baselines share one reference scVI model
(:func:`scvi_reference`), trained once and passed to both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import knn_transfer_proba
from ._embedding import highly_variable_genes, lognorm_genes

#: Highly variable genes kept by default (selected on the train cells).
N_TOP_GENES = 2000
#: Neighbours of the kNN classifiers.
KNN_K = 15
#: Principal components of :func:`knn_pca`.
N_PCS = 50
#: scVI latent dimension.
N_LATENT = 10
#: Training budgets (cell-epochs) and epoch caps of the scvi-tools models: the reference
#: scVI gets ``min(400, ceil(500,000 / n_train))`` epochs, each query model
#: ``min(100, ceil(150,000 / n_test))``, scANVI ``min(50, ceil(200,000 / n_train))``.
SCVI_BUDGET, SCVI_MAX_EPOCHS = 500_000, 400
QUERY_BUDGET, QUERY_MAX_EPOCHS = 150_000, 100
SCANVI_BUDGET, SCANVI_MAX_EPOCHS = 200_000, 50
#: Category marking unlabelled cells for scANVI.
UNLABELED = "Unknown"


@dataclass
class AnnotationResult:
    """Test-cell class probabilities of one method.

    ``proba`` is ``(n_test, k)`` with columns in the order of ``classes``; ``wall_s`` covers
    preprocessing, training and prediction; ``trainable_params`` counts the fitted
    parameters (see each baseline's docstring).
    """

    method: str
    proba: np.ndarray
    classes: list[str]
    trainable_params: int
    wall_s: float
    notes: str = ""


def _genes(train: Any, genes: list[str] | None) -> list[str]:
    return highly_variable_genes(train, N_TOP_GENES) if genes is None else list(genes)


def _labels(adata: Any, labels_key: str) -> np.ndarray:
    return adata.obs[labels_key].astype(str).to_numpy()


def _lognorm_features(train: Any, test: Any, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Dense log-normalised train and test matrices on ``genes`` (subset, then normalised)."""
    return lognorm_genes(train[:, genes]), lognorm_genes(test[:, genes])


def logreg_hvg(
    train: Any, test: Any, labels_key: str, genes: list[str] | None = None
) -> AnnotationResult:
    """Logistic regression on standardised log-normalised genes.

    Log-normalised ``genes`` (default: the train cells' highly variable genes), each gene
    standardised with the train cells' mean and standard deviation (``StandardScaler``, no
    clipping), then ``LogisticRegression(C=1.0, max_iter=1000)`` (lbfgs, multinomial, L2).
    ``trainable_params``: coefficients plus intercepts.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    x_train, x_test = _lognorm_features(train, test, _genes(train, genes))
    scaler = StandardScaler().fit(x_train)
    lr = LogisticRegression(C=1.0, max_iter=1000)
    lr.fit(scaler.transform(x_train), _labels(train, labels_key))
    proba = lr.predict_proba(scaler.transform(x_test))
    return AnnotationResult(
        method="logreg_hvg",
        proba=proba,
        classes=[str(c) for c in lr.classes_],
        trainable_params=int(lr.coef_.size + lr.intercept_.size),
        wall_s=time.perf_counter() - start,
        notes=f"{x_train.shape[1]} genes, standardised, C=1, lbfgs iterations {lr.n_iter_[0]}",
    )


def knn_pca(
    train: Any,
    test: Any,
    labels_key: str,
    genes: list[str] | None = None,
    n_pcs: int = N_PCS,
    k: int = KNN_K,
    seed: int = 0,
) -> AnnotationResult:
    """kNN (``k`` = 15, distance-weighted) on ``n_pcs`` = 50 principal components of
    log-normalised genes.

    The PCA (centred, not scaled, the usual Scanpy embedding) is fitted on the train cells
    and the test cells are projected; :func:`scfm_adapt.metrics.knn_transfer_proba` gives
    the probabilities. ``trainable_params``: the PCA components and mean (the kNN itself
    stores the train cells and fits nothing).
    """
    from sklearn.decomposition import PCA

    start = time.perf_counter()
    x_train, x_test = _lognorm_features(train, test, _genes(train, genes))
    n_comps = min(n_pcs, x_train.shape[1] - 1, x_train.shape[0] - 1)
    pca = PCA(n_components=n_comps, random_state=seed).fit(x_train)
    proba, classes = knn_transfer_proba(
        pca.transform(x_train), _labels(train, labels_key), pca.transform(x_test), k
    )
    return AnnotationResult(
        method="knn_pca",
        proba=proba,
        classes=classes,
        trainable_params=int(pca.components_.size + pca.mean_.size),
        wall_s=time.perf_counter() - start,
        notes=f"{x_train.shape[1]} genes, {n_comps} PCs, k={k}",
    )


# --------------------------------------------------------------------------- scvi-tools
@dataclass
class ScVIReference:
    """A scVI model trained on the train cells (:func:`scvi_reference`), with the train and
    test AnnData it was set up with and the seconds it took."""

    model: Any
    train: Any
    test: Any
    seconds: float


def _epochs(n_cells: int, budget: int, cap: int) -> int:
    return max(1, min(cap, math.ceil(budget / n_cells)))


def _n_trainable(model: Any) -> int:
    return int(sum(p.numel() for p in model.module.parameters() if p.requires_grad))


def _history_epochs(model: Any) -> int:
    return len(model.history["elbo_train"])


def _needs_query(train: Any, test: Any, batch_key: str | None) -> bool:
    """Whether some test batch is absent from the train cells (scArches surgery needed)."""
    if batch_key is None:
        return False
    seen = set(train.obs[batch_key].astype(str))
    return not set(test.obs[batch_key].astype(str)) <= seen


def _scvi_inputs(train: Any, test: Any, labels_key: str, genes: list[str]) -> tuple[Any, Any]:
    """Train / test AnnData for scvi-tools: counts on ``genes``, a label column
    ``_scanvi_label`` (the train labels; :data:`UNLABELED` for every test cell)."""
    train, test = train[:, genes].copy(), test[:, genes].copy()
    train.obs["_scanvi_label"] = train.obs[labels_key].astype(str).astype("category")
    test.obs["_scanvi_label"] = np.full(test.n_obs, UNLABELED)
    test.obs["_scanvi_label"] = test.obs["_scanvi_label"].astype("category")
    return train, test


def _train_kwargs(max_epochs: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "max_epochs": max_epochs,
        "train_size": 1.0,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        **kwargs,
    }


def scvi_reference(
    train: Any,
    test: Any,
    labels_key: str,
    batch_key: str | None = None,
    genes: list[str] | None = None,
    seed: int = 0,
) -> ScVIReference:
    """The scVI model of :func:`scvi_knn` and :func:`scanvi`, trained on the train cells.

    Architecture as recommended for scArches reference mapping: ``n_latent=10``,
    ``n_layers=2``, ``encode_covariates=True``, layer norm instead of batch norm,
    ``dropout_rate=0.2``, batch = ``batch_key`` when there is one. All train cells are used
    (``train_size=1.0``, no early stopping) for ``min(400, ceil(500,000 / n_train))``
    epochs.
    """
    import scvi

    start = time.perf_counter()
    train, test = _scvi_inputs(train, test, labels_key, _genes(train, genes))
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(train, batch_key=batch_key)
    model = scvi.model.SCVI(
        train,
        n_latent=N_LATENT,
        n_layers=2,
        encode_covariates=True,
        use_layer_norm="both",
        use_batch_norm="none",
        dropout_rate=0.2,
    )
    model.train(**_train_kwargs(_epochs(train.n_obs, SCVI_BUDGET, SCVI_MAX_EPOCHS)))
    return ScVIReference(model, train, test, time.perf_counter() - start)


def _scarches_query(cls: Any, reference: Any, test: Any, seed: int) -> tuple[Any, Any, str]:
    """Map the test cells onto ``reference`` with scArches (unseen batches).

    ``cls.prepare_query_anndata`` + ``cls.load_query_data`` (default freezing: only the new
    batches' weights train), then ``min(100, ceil(150,000 / n_test))`` epochs on the test
    cells with ``weight_decay=0`` as in scvi-tools' tutorials. Returns the query model, the
    registered test AnnData and a note for :attr:`AnnotationResult.notes`.
    """
    import scvi

    start = time.perf_counter()
    query = test.copy()
    cls.prepare_query_anndata(query, reference)
    scvi.settings.seed = seed
    model = cls.load_query_data(query, reference)
    model.train(
        **_train_kwargs(
            _epochs(query.n_obs, QUERY_BUDGET, QUERY_MAX_EPOCHS),
            plan_kwargs={"weight_decay": 0.0},
        )
    )
    seconds = time.perf_counter() - start
    note = f"; scArches query {_history_epochs(model)} epochs on test cells ({seconds:.0f} s)"
    return model, query, note


def scvi_knn(
    train: Any,
    test: Any,
    labels_key: str,
    batch_key: str | None = None,
    genes: list[str] | None = None,
    seed: int = 0,
    reference: ScVIReference | None = None,
    k: int = KNN_K,
) -> AnnotationResult:
    """kNN (``k`` = 15, distance-weighted) on the scVI latent space (posterior means).

    scVI is trained on the train cells (``reference``, or :func:`scvi_reference` when
    ``None``). When the test cells come from batches the model never saw, they are mapped
    scArches-style: ``SCVI.prepare_query_anndata`` + ``SCVI.load_query_data`` (only the new
    batches' weights are trained) and a brief query training (``weight_decay=0``) on the
    unlabelled test cells; train and test cells are then both embedded with the query
    model. Without unseen batches the reference model embeds the test cells directly.
    ``trainable_params``: parameters of the reference scVI model. ``wall_s`` includes its
    training.
    """
    import scvi

    if reference is None:
        reference = scvi_reference(train, test, labels_key, batch_key, genes, seed)
    ref, ref_train, ref_test, ref_s = (
        reference.model,
        reference.train,
        reference.test,
        reference.seconds,
    )
    start = time.perf_counter()
    notes = f"scVI {_history_epochs(ref)} epochs ({ref_s:.0f} s)"
    model = ref
    if _needs_query(train, test, batch_key):
        model, ref_test, notes_q = _scarches_query(scvi.model.SCVI, ref, ref_test, seed)
        notes += notes_q
    z_train = model.get_latent_representation(ref_train)
    z_test = model.get_latent_representation(ref_test)
    proba, classes = knn_transfer_proba(z_train, _labels(train, labels_key), z_test, k)
    return AnnotationResult(
        method="scvi_knn",
        proba=proba,
        classes=classes,
        trainable_params=_n_trainable(ref),
        wall_s=ref_s + time.perf_counter() - start,
        notes=notes + f"; k={k}",
    )


def scanvi(
    train: Any,
    test: Any,
    labels_key: str,
    batch_key: str | None = None,
    genes: list[str] | None = None,
    seed: int = 0,
    reference: ScVIReference | None = None,
) -> AnnotationResult:
    """scANVI initialised from the reference scVI, soft predictions for the test cells.

    ``SCANVI.from_scvi_model(scvi, unlabeled_category="Unknown", labels_key=...)`` trained
    on the (fully labelled) train cells with ``n_samples_per_label=100`` as in scvi-tools'
    tutorials, for ``min(50, ceil(200,000 / n_train))`` epochs; then, for unseen test
    batches, ``SCANVI.load_query_data`` and a brief query training with ``weight_decay=0``
    on the test cells, all labelled ``"Unknown"`` (the classifier stays frozen); then
    ``predict(soft=True)``. ``reference``: the scVI model (:func:`scvi_reference` when
    ``None``). ``trainable_params``: parameters of the reference scANVI model. ``wall_s``
    includes the scVI pre-training.
    """
    import scvi

    if reference is None:
        reference = scvi_reference(train, test, labels_key, batch_key, genes, seed)
    ref_scvi, test_ad, ref_s = reference.model, reference.test, reference.seconds
    start = time.perf_counter()
    scvi.settings.seed = seed
    model = scvi.model.SCANVI.from_scvi_model(
        ref_scvi, unlabeled_category=UNLABELED, labels_key="_scanvi_label"
    )
    n_params = _n_trainable(model)
    model.train(
        **_train_kwargs(
            _epochs(ref_scvi.adata.n_obs, SCANVI_BUDGET, SCANVI_MAX_EPOCHS),
            n_samples_per_label=100,
        )
    )
    notes = (
        f"scVI {_history_epochs(ref_scvi)} epochs ({ref_s:.0f} s) + scANVI "
        f"{_history_epochs(model)} epochs ({time.perf_counter() - start:.0f} s)"
    )
    if _needs_query(train, test, batch_key):
        model, test_ad, notes_q = _scarches_query(scvi.model.SCANVI, model, test_ad, seed)
        notes += notes_q
    soft = model.predict(test_ad, soft=True)
    classes = sorted(train.obs[labels_key].astype(str).unique())
    proba = soft[classes].to_numpy()
    return AnnotationResult(
        method="scanvi",
        proba=proba,
        classes=classes,
        trainable_params=n_params,
        wall_s=ref_s + time.perf_counter() - start,
        notes=notes,
    )

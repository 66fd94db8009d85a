"""scArches / SCANVI rows of the label-efficiency benchmark: a scVI reference trained on the
very files the PBMC reference pretrained on, queries mapped onto it by scArches surgery.

The settings are scvi-tools' reference-mapping tutorial's (scArches-style scVI: layer
norm, no batch norm, encoded covariates; query training without weight decay; SCANVI
with 100 cells per label per batch), not tuned here.

- :func:`reference`: scVI on the combined counts of ``pbmc_reference.py`` (``data.h5ad``,
  one batch per file; a gene a file lacks is 0 there, as scArches pads it), and SCANVI
  from it on the Kang control cells' types (the other cells unlabelled).
- :func:`map_query`: the query's cells (label pool and evaluation cells, no labels) added
  to the reference as a new batch by ``SCVI.load_query_data`` and trained; genes the
  reference has and the query lacks are padded with zeros.
- :func:`few_labels`: SCANVI from the mapped query model, its k labelled pool cells
  labelled and every other cell unlabelled; probabilities of the evaluation cells.
- :func:`latent_knn`: kNN on the mapped latent (scArches' own label transfer);
  :func:`embedding_knn` the same on any embedding (the SCFM reference's, for its row).
- :func:`zero_shot`: the reference SCANVI mapped to the query and its classifier applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

BATCH = "dataset"
REFERENCE_LABELS = "cell_type"
UNLABELLED = "Unknown"
#: scArches-style scVI (scvi-tools' reference-mapping tutorial).
ARCHES = {
    "use_layer_norm": "both",
    "use_batch_norm": "none",
    "encode_covariates": True,
    "dropout_rate": 0.2,
    "n_layers": 2,
}
REFERENCE_EPOCHS = 100
QUERY_EPOCHS = 100
SCANVI_EPOCHS = 20


def reference(folder: Path, seed: int = 0):
    """``(scvi_model, scanvi_model)`` trained on ``folder / "data.h5ad"``."""
    import anndata as ad
    import scvi

    scvi.settings.seed = seed
    data = ad.read_h5ad(folder / "data.h5ad")
    data.obs = data.obs[[BATCH, REFERENCE_LABELS]].astype(str).astype("category")
    data.uns = {}
    scvi.model.SCVI.setup_anndata(data, batch_key=BATCH)
    ref = scvi.model.SCVI(data, **ARCHES)
    ref.train(max_epochs=REFERENCE_EPOCHS, enable_progress_bar=False)
    lab = scvi.model.SCANVI.from_scvi_model(
        ref, unlabeled_category=UNLABELLED, labels_key=REFERENCE_LABELS
    )
    lab.train(max_epochs=SCANVI_EPOCHS, n_samples_per_label=100, enable_progress_bar=False)
    return ref, lab


def _query(adata, model):
    q = adata.copy()
    q.obs = q.obs.iloc[:, :0].copy()
    q.obs[BATCH] = "query"
    q.obs[REFERENCE_LABELS] = UNLABELLED
    type(model).prepare_query_anndata(q, model)
    return q


def map_query(adata, ref, seed: int = 0):
    """The query's cells mapped onto the scVI reference (scArches surgery)."""
    import scvi

    scvi.settings.seed = seed
    q = _query(adata, ref)
    qm = scvi.model.SCVI.load_query_data(q, ref)
    qm.train(max_epochs=QUERY_EPOCHS, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    return qm


def few_labels(qm, labelled_names, labels, evaluation_names, seed: int):
    """SCANVI from the mapped query model with ``labels`` on the cells ``labelled_names``;
    ``(proba, classes)`` of ``evaluation_names``."""
    import scvi

    scvi.settings.seed = seed
    a = qm.adata.copy()
    # the mapped model's batch categories (the reference's, then "query"), so the new
    # setup codes the query's batch as the model does
    mapping = qm.adata_manager.get_state_registry("batch").categorical_mapping
    a.obs[BATCH] = pd.Categorical(a.obs[BATCH].astype(str), categories=list(mapping))
    y = np.full(a.n_obs, UNLABELLED, dtype=object)
    pos = a.obs_names.get_indexer(labelled_names)
    y[pos] = np.asarray(labels, dtype=object)
    a.obs["few_labels"] = y
    model = scvi.model.SCANVI.from_scvi_model(
        qm, unlabeled_category=UNLABELLED, labels_key="few_labels", adata=a
    )
    model.train(max_epochs=SCANVI_EPOCHS, n_samples_per_label=100, enable_progress_bar=False)
    ev = a[a.obs_names.get_indexer(evaluation_names)]
    proba = model.predict(ev, soft=True)
    return proba.to_numpy(), [str(c) for c in proba.columns]


def latent_knn(qm, labelled_names, labels, evaluation_names, k: int = 15):
    """kNN (distance-weighted) on the mapped latent: ``(proba, classes)``."""
    z = qm.get_latent_representation()
    return embedding_knn(z, qm.adata.obs_names, labelled_names, labels, evaluation_names, k)


def embedding_knn(z, names, labelled_names, labels, evaluation_names, k: int = 15):
    """kNN (distance-weighted) on an embedding ``z`` of the cells ``names``: the
    labelled cells' labels, probabilities of the evaluation cells ``(proba, classes)``."""
    from sklearn.neighbors import KNeighborsClassifier

    train = z[names.get_indexer(labelled_names)]
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train) - 1), weights="distance")
    knn.fit(train, np.asarray(labels).astype(str))
    return knn.predict_proba(z[names.get_indexer(evaluation_names)]), list(knn.classes_)


def zero_shot(evaluation, lab, seed: int = 0):
    """The reference SCANVI mapped to ``evaluation`` (no labels) and its classifier
    applied: ``(proba, classes)``."""
    import scvi

    scvi.settings.seed = seed
    q = _query(evaluation, lab)
    qm = scvi.model.SCANVI.load_query_data(q, lab)
    qm.train(max_epochs=QUERY_EPOCHS, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    proba = qm.predict(soft=True)
    return proba.to_numpy(), [str(c) for c in proba.columns]

"""Metrics, each defined once, on any data: generated vs real cells, predicted perturbation
responses, embeddings and classifiers.

>>> import scfm_adapt as sfa
>>> sfa.metrics.classifier_two_sample_test(real, generated)  # 0.5: indistinguishable
>>> sfa.metrics.evaluate_generation(real, generated, groupby="cell_type")
>>> L = sfa.metrics.lognorm
>>> sfa.metrics.evaluate_unit(L(pred), L(true), L(ctrl))  # pearson_delta, r2_top100, ...
>>> sfa.metrics.knn_transfer(x_ref, y_ref, x_query, y_query)  # accuracy, macro-F1
"""

from ._classification import classification_metrics, expected_calibration_error
from ._distribution import (
    classifier_two_sample_test,
    embed_pair,
    energy_distance,
    evaluate_generation,
    gene_statistics,
    label_fidelity,
    label_fidelity_embedded,
    mmd,
    precision_recall,
    precision_recall_embedded,
    wasserstein_distance,
    wasserstein_embedded,
)
from ._embedding import (
    batch_mixing_entropy,
    knn_transfer,
    knn_transfer_proba,
    label_clustering,
    neighbor_agreement,
)
from ._expression import lognorm, lognormalize
from ._latent import latent_usage
from ._perturbation import (
    METRICS,
    cosine_lfc,
    de_genes,
    evaluate_predictions,
    evaluate_unit,
    pearson_delta,
    perturbation_energy_distance,
    r2_means,
    rank_metric,
    sign_accuracy,
    summarize,
)

__all__ = [
    "METRICS",
    "batch_mixing_entropy",
    "classification_metrics",
    "classifier_two_sample_test",
    "cosine_lfc",
    "de_genes",
    "embed_pair",
    "energy_distance",
    "evaluate_generation",
    "evaluate_predictions",
    "evaluate_unit",
    "expected_calibration_error",
    "gene_statistics",
    "knn_transfer",
    "knn_transfer_proba",
    "label_clustering",
    "label_fidelity",
    "label_fidelity_embedded",
    "latent_usage",
    "lognorm",
    "lognormalize",
    "mmd",
    "neighbor_agreement",
    "pearson_delta",
    "perturbation_energy_distance",
    "precision_recall",
    "precision_recall_embedded",
    "r2_means",
    "rank_metric",
    "sign_accuracy",
    "summarize",
    "wasserstein_distance",
    "wasserstein_embedded",
]

"""Simple baselines, exactly defined, on any data: perturbation responses, cell-type
annotation and embeddings. Score them with :mod:`scfm_adapt.metrics`.

>>> import scfm_adapt as sfa
>>> table = sfa.baselines.PerturbationTable(train, "condition", "control", ["cell_type"])
>>> delta = sfa.baselines.mean_shift_delta(table, "A+B", context="k562")
>>> pred = sfa.baselines.shifted_cells(sfa.metrics.lognorm(ctrl), delta)
>>> sfa.metrics.evaluate_unit(pred, sfa.metrics.lognorm(true), sfa.metrics.lognorm(ctrl))
>>> sfa.baselines.logreg_hvg(train, test, "cell_type").proba  # annotation baseline

Every benchmark under ``benchmarks/`` reports these baselines beside the model, on the same
split: simple baselines often match deep models on these tasks.
"""

from ._annotation import (
    AnnotationResult,
    ScVIReference,
    knn_pca,
    logreg_hvg,
    scanvi,
    scvi_knn,
    scvi_reference,
)
from ._embedding import highly_variable_genes, log_normalized, lognorm_genes, pca_embedding
from ._perturbation import (
    LinearPCARidge,
    PerturbationTable,
    ScVILatentArithmetic,
    additive_delta,
    mean_shift_delta,
    shift_by_rule,
    shifted_cells,
    unit_means,
)

__all__ = [
    "AnnotationResult",
    "LinearPCARidge",
    "PerturbationTable",
    "ScVILatentArithmetic",
    "ScVIReference",
    "additive_delta",
    "highly_variable_genes",
    "knn_pca",
    "log_normalized",
    "lognorm_genes",
    "logreg_hvg",
    "mean_shift_delta",
    "pca_embedding",
    "scanvi",
    "scvi_knn",
    "scvi_reference",
    "shift_by_rule",
    "shifted_cells",
    "unit_means",
]

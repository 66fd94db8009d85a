"""Baselines and metrics for perturbation-response prediction, usable on any data.

>>> import scfm_adapt as sfa
>>> table = sfa.benchmark.PerturbationTable(train, "condition", "control", ["cell_type"])
>>> delta = sfa.benchmark.mean_shift_delta(table, "A+B", context="k562")
>>> pred = sfa.benchmark.shifted_cells(sfa.benchmark.lognorm(ctrl), delta)
>>> sfa.benchmark.evaluate_unit(pred, sfa.benchmark.lognorm(true), sfa.benchmark.lognorm(ctrl))

Every benchmark under ``benchmarks/`` reports these baselines beside the model, on the same
split: simple baselines often match deep models on these tasks.
"""

from ._baselines import (
    LinearPCARidge,
    PerturbationTable,
    ScVILatentArithmetic,
    additive_delta,
    canonical_perturbation,
    context_labels,
    mean_shift_delta,
    shift_by_rule,
    shifted_cells,
    split_perturbation,
    unit_means,
)
from ._metrics import (
    METRICS,
    cosine_lfc,
    de_genes,
    energy_distance,
    evaluate_predictions,
    evaluate_unit,
    lognorm,
    pearson_delta,
    r2_means,
    rank_metric,
    sign_accuracy,
    summarize,
)

__all__ = [
    "METRICS",
    "LinearPCARidge",
    "PerturbationTable",
    "ScVILatentArithmetic",
    "additive_delta",
    "canonical_perturbation",
    "context_labels",
    "cosine_lfc",
    "de_genes",
    "energy_distance",
    "evaluate_predictions",
    "evaluate_unit",
    "lognorm",
    "mean_shift_delta",
    "pearson_delta",
    "r2_means",
    "rank_metric",
    "shift_by_rule",
    "shifted_cells",
    "sign_accuracy",
    "split_perturbation",
    "summarize",
    "unit_means",
]

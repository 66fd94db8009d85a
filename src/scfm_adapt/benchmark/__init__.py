"""Deprecated: ``sfa.benchmark`` moved, kept for one release.

Its names now live where their concept does: the baselines in :mod:`scfm_adapt.baselines`,
the metrics (and ``lognorm``) in :mod:`scfm_adapt.metrics`, perturbation-name parsing in
:mod:`scfm_adapt.data`. ``sfa.benchmark.energy_distance`` (PCA fitted on a reference) is
:func:`scfm_adapt.metrics.perturbation_energy_distance`; ``sfa.metrics.energy_distance``
is the one of generated vs real counts. Every old name still works and warns with a
:class:`DeprecationWarning` naming its new home.
"""

from __future__ import annotations

import importlib
import warnings

#: Old name -> (new module, new name).
_MOVED = {
    **{
        name: ("scfm_adapt.baselines", name)
        for name in (
            "LinearPCARidge",
            "PerturbationTable",
            "ScVILatentArithmetic",
            "additive_delta",
            "mean_shift_delta",
            "shift_by_rule",
            "shifted_cells",
            "unit_means",
        )
    },
    **{
        name: ("scfm_adapt.data", name)
        for name in ("canonical_perturbation", "context_labels", "split_perturbation")
    },
    **{
        name: ("scfm_adapt.metrics", name)
        for name in (
            "METRICS",
            "cosine_lfc",
            "de_genes",
            "evaluate_predictions",
            "evaluate_unit",
            "lognorm",
            "pearson_delta",
            "r2_means",
            "rank_metric",
            "sign_accuracy",
            "summarize",
        )
    },
    "energy_distance": ("scfm_adapt.metrics", "perturbation_energy_distance"),
}

__all__ = sorted(_MOVED)


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'scfm_adapt.benchmark' has no attribute {name!r}")
    module, new = _MOVED[name]
    warnings.warn(
        f"scfm_adapt.benchmark.{name} is deprecated and will be removed in the next release: "
        f"use {module}.{new}.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), new)


def __dir__():
    return sorted([*globals(), *_MOVED])

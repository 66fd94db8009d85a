"""sfa.benchmark is kept for one release: every old name works and warns."""

from __future__ import annotations

import numpy as np
import pytest

import scfm_adapt as sfa
from scfm_adapt import baselines, data, metrics


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("PerturbationTable", baselines.PerturbationTable),
        ("LinearPCARidge", baselines.LinearPCARidge),
        ("ScVILatentArithmetic", baselines.ScVILatentArithmetic),
        ("mean_shift_delta", baselines.mean_shift_delta),
        ("additive_delta", baselines.additive_delta),
        ("shift_by_rule", baselines.shift_by_rule),
        ("shifted_cells", baselines.shifted_cells),
        ("unit_means", baselines.unit_means),
        ("canonical_perturbation", data.canonical_perturbation),
        ("split_perturbation", data.split_perturbation),
        ("context_labels", data.context_labels),
        ("lognorm", metrics.lognorm),
        ("pearson_delta", metrics.pearson_delta),
        ("r2_means", metrics.r2_means),
        ("sign_accuracy", metrics.sign_accuracy),
        ("cosine_lfc", metrics.cosine_lfc),
        ("de_genes", metrics.de_genes),
        ("rank_metric", metrics.rank_metric),
        ("evaluate_unit", metrics.evaluate_unit),
        ("evaluate_predictions", metrics.evaluate_predictions),
        ("summarize", metrics.summarize),
        ("METRICS", metrics.METRICS),
        # the reference-PCA energy distance, not sfa.metrics.energy_distance
        ("energy_distance", metrics.perturbation_energy_distance),
    ],
)
def test_old_names_warn_and_are_the_new_objects(old, new):
    with pytest.warns(DeprecationWarning, match=r"scfm_adapt\.(baselines|data|metrics)\."):
        assert getattr(sfa.benchmark, old) is new


def test_from_import_and_unknown_names():
    with pytest.warns(DeprecationWarning, match="scfm_adapt.baselines.PerturbationTable"):
        from scfm_adapt.benchmark import PerturbationTable
    assert PerturbationTable is baselines.PerturbationTable
    assert set(sfa.benchmark.__all__) <= set(dir(sfa.benchmark))
    with pytest.raises(AttributeError):
        sfa.benchmark.not_a_name  # noqa: B018


def test_old_energy_distance_keeps_its_meaning():
    rng = np.random.default_rng(0)
    ref, x = rng.normal(size=(50, 4)), rng.normal(size=(20, 4))
    with pytest.warns(DeprecationWarning, match="perturbation_energy_distance"):
        old = sfa.benchmark.energy_distance(x + 1.0, x, ref, n_pcs=3)
    assert old == metrics.perturbation_energy_distance(x + 1.0, x, ref, n_pcs=3)

"""The cells ``benchmarks/perturbation.py --save-predictions`` writes for cell-eval: one
control group, every unit's cells under its name, the cell-mean baseline, and a refusal
where units have different control cells (cell-eval knows one control group per file)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import load_benchmark


def _perturbation_bench():
    return load_benchmark("perturbation")


@pytest.fixture
def toy_task():
    rng = np.random.default_rng(0)
    genes = pd.Index([f"g{i}" for i in range(6)])
    counts = rng.poisson(3.0, (8, 6)).astype(np.float32)
    obs = pd.DataFrame({"condition": ["control"] * 4 + ["A"] * 2 + ["B"] * 2})
    obs.index = obs.index.astype(str)
    train = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=genes))
    setup = {"perturbation_key": "condition", "control_group": "control"}
    return {"train": train, "setup": setup}


def test_saved_cells_hold_the_controls_every_unit_and_the_cell_mean(toy_task, tmp_path):
    bench = _perturbation_bench()
    ctrl = np.full((3, 6), 0.5)
    truth = {"X": np.ones((2, 6)), "Y": np.full((4, 6), 2.0)}
    preds = {"m": {"X": np.zeros((3, 6)), "Y": np.full((3, 6), 3.0)}}
    bench.save_predictions(tmp_path, toy_task, preds, truth, {"X": ctrl, "Y": ctrl.copy()})

    real = ad.read_h5ad(tmp_path / "real.h5ad")
    assert real.obs["condition"].tolist() == ["control"] * 3 + ["X"] * 2 + ["Y"] * 4
    np.testing.assert_allclose(real.X[:3], ctrl)
    np.testing.assert_allclose(real.X[5:], 2.0)
    assert list(real.var_names) == list(toy_task["train"].var_names)

    m = ad.read_h5ad(tmp_path / "m.h5ad")
    assert m.obs["condition"].value_counts().to_dict() == {"control": 3, "X": 3, "Y": 3}
    np.testing.assert_allclose(m.X[m.obs["condition"] == "Y"], 3.0)

    # the cell-mean baseline: every unit's cells are the mean perturbed training cell
    import scfm_adapt as sfa

    mean = sfa.metrics.lognorm(toy_task["train"][4:]).mean(0)
    cm = ad.read_h5ad(tmp_path / "cell_mean.h5ad")
    for unit, n in (("X", 2), ("Y", 4)):
        cells = cm.X[(cm.obs["condition"] == unit).to_numpy()]
        assert cells.shape == (n, 6)
        np.testing.assert_allclose(cells, np.tile(mean, (n, 1)), rtol=1e-6)


def test_units_with_different_controls_are_refused(toy_task, tmp_path):
    bench = _perturbation_bench()
    truth = {"X": np.ones((2, 6)), "Y": np.ones((2, 6))}
    ctrls = {"X": np.zeros((3, 6)), "Y": np.ones((3, 6))}
    with pytest.raises(ValueError, match="one control group"):
        bench.save_predictions(tmp_path, toy_task, {}, truth, ctrls)

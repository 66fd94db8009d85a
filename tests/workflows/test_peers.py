"""The plumbing between the benchmarks and the peers' runners (``benchmarks/peers/``): the
exported cells name control and context plainly, a peer's fold is split into its units and
refused when it does not give one cell per control cell, the rank is taken across folds, and
the shift baselines can be scored without training scVI."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import load_benchmark


@pytest.fixture
def kang_like():
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "group_id": ["ctrl", "ctrl", "stim", "stim", "ctrl", "stim"],
            "cluster_id": ["B", "T", "B", "T", "T", "T"],
            "other": range(6),
        }
    )
    obs.index = obs.index.astype(str)
    counts = rng.poisson(4.0, (6, 5)).astype(np.float32)
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(5)]))


def test_exported_cells_name_the_control_and_the_context(kang_like):
    export = load_benchmark("peers/export")
    setup = {
        "perturbation_key": "group_id",
        "control_group": "ctrl",
        "covariate_keys": ["cluster_id"],
    }
    plain = export._plain(kang_like, setup)
    assert list(plain.obs.columns) == ["perturbation", "context"]
    assert plain.obs["perturbation"].tolist() == [
        "control",
        "control",
        "stim",
        "stim",
        "control",
        "stim",
    ]
    assert plain.obs["context"].tolist() == ["B", "T", "B", "T", "T", "T"]
    np.testing.assert_array_equal(plain.X, kang_like.X)  # counts untouched
    no_ctx = export._plain(kang_like, {"perturbation_key": "group_id", "control_group": "ctrl"})
    assert set(no_ctx.obs["context"]) == {""}


GENES = ["g0", "g1"]


def _fold(tmp_path, units, x, genes=GENES):
    obs = pd.DataFrame({"unit": units})
    obs.index = obs.index.astype(str)
    path = tmp_path / "fold0.h5ad"
    var = pd.DataFrame(index=genes)
    ad.AnnData(np.asarray(x, np.float32), obs=obs, var=var).write_h5ad(path)
    return path


def test_a_fold_is_split_into_its_units_in_order(tmp_path):
    score = load_benchmark("peers/score")
    x = np.arange(10, dtype=float).reshape(5, 2)
    path = _fold(tmp_path, ["A", "B", "A", "B", "B"], x)
    ctrls = {"A": np.zeros((2, 2)), "B": np.zeros((3, 2))}
    out = score._peer_units(path, ctrls, GENES)
    np.testing.assert_array_equal(out["A"], x[[0, 2]])
    np.testing.assert_array_equal(out["B"], x[[1, 3, 4]])


def test_a_fold_without_one_cell_per_control_cell_is_refused(tmp_path):
    score = load_benchmark("peers/score")
    path = _fold(tmp_path, ["A", "A", "B"], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="one prediction per control cell"):
        score._peer_units(path, {"A": np.zeros((2, 2)), "B": np.zeros((2, 2))}, GENES)
    bad = _fold(tmp_path, ["A", "A"], [[0.0, np.nan], [1.0, 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        score._peer_units(bad, {"A": np.zeros((2, 2))}, GENES)
    swapped = _fold(tmp_path, ["A", "A"], np.zeros((2, 2)), genes=["g1", "g0"])
    with pytest.raises(ValueError, match="training genes"):
        score._peer_units(swapped, {"A": np.zeros((2, 2))}, GENES)


def test_rank_puts_each_prediction_against_every_units_truth():
    score = load_benchmark("peers/score")
    true_d = {"u1": np.array([1.0, 0, 0]), "u2": np.array([0, 1.0, 0]), "u3": np.array([0, 0, 1.0])}
    deltas = {
        "right": dict(true_d),
        "swapped": {"u1": true_d["u2"], "u2": true_d["u1"], "u3": true_d["u3"]},
    }
    table = pd.DataFrame(
        {"method": ["right"] * 3 + ["swapped"] * 3, "unit": ["u1", "u2", "u3"] * 2, "rank": np.nan}
    )
    score._rank_across_folds(table, deltas, true_d)
    right = table[table["method"] == "right"]["rank"].to_numpy()
    swapped = table[table["method"] == "swapped"]["rank"].to_numpy()
    np.testing.assert_allclose(right, 0.0)  # each unit's prediction is nearest its own truth
    assert swapped[0] > 0 and swapped[1] > 0 and swapped[2] == 0


def test_shift_baselines_are_scored_without_scvi(kang_like):
    bench = load_benchmark("perturbation")
    a = kang_like
    setup = {
        "perturbation_key": "group_id",
        "control_group": "ctrl",
        "covariate_keys": ["cluster_id"],
    }
    is_b_stim = ((a.obs["cluster_id"] == "B") & (a.obs["group_id"] == "stim")).to_numpy()
    is_b_ctrl = ((a.obs["cluster_id"] == "B") & (a.obs["group_id"] == "ctrl")).to_numpy()
    task = {
        "train": a[~is_b_stim].copy(),
        "setup": setup,
        "test": {("stim", "B"): (a[is_b_ctrl].copy(), a[is_b_stim].copy())},
        "features": None,
    }
    preds, truth, ctrls, _ = bench.baseline_predictions(task, scvi_epochs=None)
    assert set(preds) == {"no_change", "mean_shift", "additive", "linear"}
    assert list(truth) == ["stim@B"]
    # the mean shift moves every control cell by the same training delta, so it differs
    # from the control cells by one constant row
    shift = preds["mean_shift"]["stim@B"] - ctrls["stim@B"]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-6)
    assert np.abs(shift).sum() > 0


def test_a_unit_the_peer_cannot_predict_is_left_out_and_a_stranger_is_refused(tmp_path):
    score = load_benchmark("peers/score")
    path = _fold(tmp_path, ["B", "B"], np.ones((2, 2)))
    out = score._peer_units(path, {"A": np.zeros((3, 2)), "B": np.zeros((2, 2))}, GENES)
    assert list(out) == ["B"]
    stranger = _fold(tmp_path, ["C"], np.ones((1, 2)))
    with pytest.raises(ValueError, match="not held-out units"):
        score._peer_units(stranger, {"A": np.zeros((1, 2))}, GENES)


def test_predictions_are_found_by_exact_name_and_their_seconds_summed(tmp_path):
    import json

    score = load_benchmark("peers/score")
    for peer, seed, name in (("p", 0, "kang8"), ("p", 1, "kang8"), ("p", 0, "kang8_old")):
        folder = tmp_path / peer / f"seed{seed}" / "annotation"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.csv").write_text("x")
    found = score._seeds(tmp_path, "annotation", "kang8")
    assert {s: p.name for s, p in found["p"].items()} == {0: "kang8.csv", 1: "kang8.csv"}

    folder = tmp_path / "meta"
    folder.mkdir()
    layouts = (
        {"folds": [{"wall_s": 2.0}, {"wall_s": 3.0}, {"skipped": "all"}]},  # a list
        {"folds": {"fold0": {"wall_s": 2.0}, "fold1": {"wall_s": 3.0}}},  # a dict
        {"folds": {"fold0": {"seconds": 2.0}, "fold1": {"seconds": 3.0}}},  # "seconds"
    )
    for meta in layouts:
        (folder / "meta.json").write_text(json.dumps(meta))
        assert score._wall(folder) == 5.0
    (folder / "meta.json").write_text(json.dumps({"folds": [{"skipped": "all"}]}))
    assert np.isnan(score._wall(folder))  # no seconds at all: unknown, not zero
    (folder / "meta.json").write_text(json.dumps({"kang8": {"wall_s": 1.5}}))
    assert score._wall(folder, "kang8") == 1.5

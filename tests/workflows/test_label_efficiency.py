"""The label-efficiency benchmark's draws (benchmarks/label_efficiency.py): k labelled cells
per type from the pool, every cell of a type that has fewer, the whole pool for "all"."""

from __future__ import annotations

import numpy as np

from conftest import REPO, load_benchmark, make_adata


def test_draws_take_k_cells_per_type_and_differ_by_seed(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its helpers (_common, ...)
    le = load_benchmark("label_efficiency")
    pool = make_adata(n_cells=90, seed=0)
    pool = pool[~((pool.obs["cell_type"] == "type2").to_numpy() & (np.arange(90) > 20))].copy()
    counts = pool.obs["cell_type"].value_counts()
    five = le.draw(pool, "cell_type", "5", 0)
    got = five.obs["cell_type"].value_counts()
    for t, n in counts.items():
        assert got[t] == min(5, n)
    assert set(five.obs_names) <= set(pool.obs_names)
    other = le.draw(pool, "cell_type", "5", 1)
    assert list(other.obs_names) != list(five.obs_names)
    assert list(le.draw(pool, "cell_type", "5", 0).obs_names) == list(five.obs_names)
    assert le.draw(pool, "cell_type", "all", 3).n_obs == pool.n_obs

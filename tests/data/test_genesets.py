"""Gene sets and gene graphs: selection, memberships, GMT files, graphs between sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scfm_adapt.data import (
    OTHER_GENES,
    as_gene_graph,
    memberships,
    read_gmt,
    select_gene_sets,
    set_graph,
)
from scfm_adapt.errors import GeneMismatchError, SCFMInputError


# ---------------------------------------------------------------------- gene sets, graphs
def test_select_gene_sets_filters_and_is_deterministic():
    genes = [f"g{i}" for i in range(100)]
    sets = {
        "big": genes[:60],
        "dup": genes[:58],  # overlaps 'big' almost entirely: skipped once 'big' is chosen
        "mid": genes[50:80],
        "small": genes[:3],  # under min_size
        "alien": ["X1", "X2", "X3"] * 5,
    }
    out = select_gene_sets(sets, genes, min_size=5, max_size=100, max_sets=2)
    assert list(out) == ["big", "mid"]
    np.testing.assert_array_equal(out["mid"], np.arange(50, 80))
    again = select_gene_sets(dict(reversed(list(sets.items()))), genes, 5, 100, 2)
    assert list(again) == list(out)
    with pytest.raises(GeneMismatchError, match="identifiers"):
        select_gene_sets({"a": ["X"] * 20}, genes)


def test_memberships_add_a_catch_all_set():
    sel = {"a": np.array([0, 1]), "b": np.array([1, 2])}
    names, si, gi = memberships(sel, 5)
    assert names == ["a", "b", OTHER_GENES]
    np.testing.assert_array_equal(gi[si == 2], [3, 4])
    names, si, _ = memberships(sel, 3)
    assert names == ["a", "b"] and si.max() == 1


def test_read_gmt(tmp_path):
    f = tmp_path / "sets.gmt"
    f.write_text("A\tdesc\tg1\tg2\nB\t\tg3\n")
    assert read_gmt(f) == {"A": ["g1", "g2"], "B": ["g3"]}
    f.write_text("A\tdesc\n")
    with pytest.raises(SCFMInputError, match="no genes"):
        read_gmt(f)


def test_gene_graph_inputs_agree():
    genes = ["a", "b", "c", "d"]
    m = np.zeros((4, 4))
    m[0, 1] = m[2, 3] = 1
    e1 = as_gene_graph(m, genes)
    e2 = as_gene_graph(pd.DataFrame({"s": ["b", "c", "x"], "t": ["a", "d", "a"]}), genes)
    np.testing.assert_array_equal(e1, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(e1, e2)
    with pytest.raises(SCFMInputError, match="4 x 4"):
        as_gene_graph(np.zeros((3, 3)), genes)
    with pytest.raises(SCFMInputError, match="no edge"):
        as_gene_graph([("x", "y")], genes)


def test_set_graph_links_overlapping_and_connected_sets():
    si = np.array([0, 0, 1, 1, 2])
    gi = np.array([0, 1, 1, 2, 3])  # sets 0 and 1 share gene 1; set 2 shares nothing
    np.testing.assert_array_equal(set_graph(si, gi, 3), [[0, 1]])
    with_edge = set_graph(si, gi, 3, gene_edges=np.array([[2, 3]]))
    np.testing.assert_array_equal(with_edge, [[0, 1], [1, 2]])

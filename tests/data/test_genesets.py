"""Gene sets and gene graphs: selection, memberships, GMT files, graphs between sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scfm_adapt.data import (
    OTHER_GENES,
    as_gene_graph,
    go_gene_sets,
    graph_density,
    is_catch_all,
    memberships,
    read_gmt,
    residual_programmes,
    select_gene_sets,
    set_components,
    set_coverage,
    set_graph,
    uncovered_genes,
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


def test_residual_programmes_split_the_catch_all_by_expression():
    rng = np.random.default_rng(0)
    sel = {"a": np.array([0, 1])}
    rest = uncovered_genes(sel, 8)
    np.testing.assert_array_equal(rest, np.arange(2, 8))
    # genes 2-4 rise in the first 50 cells, genes 5-7 in the last 50
    x = rng.normal(0, 0.1, size=(100, 8))
    x[:50, 2:5] += 3.0
    x[50:, 5:8] += 3.0
    groups = residual_programmes(x[:, rest], rest, [f"g{i}" for i in range(8)], 2)
    assert all(map(is_catch_all, groups)) and len(groups) == 2
    assert sorted(map(tuple, groups.values())) == [(2, 3, 4), (5, 6, 7)]
    assert next(iter(groups)).startswith(f"{OTHER_GENES} 1: g")
    names, si, gi = memberships(sel, 8, residual=groups)
    assert names[1:] == list(groups)
    np.testing.assert_array_equal(np.sort(gi[si >= 1]), rest)
    # one programme (or fewer genes than asked for): the single catch-all
    assert list(residual_programmes(x[:, rest], rest, [f"g{i}" for i in range(8)], 1)) == [
        OTHER_GENES
    ]
    with pytest.raises(ValueError, match="exactly the genes in no set"):
        memberships(sel, 8, residual={f"{OTHER_GENES} 1": np.array([2, 3])})
    # coverage counts every catch-all token as the catch-all
    var = np.arange(8, dtype=float) + 1.0
    cov = set_coverage(si, gi, names, var)
    assert (cov["n_sets"], cov["n_catch_all"], cov["genes_in_sets"]) == (1, 2, 2)
    assert cov["variance_in_sets"] == pytest.approx(3 / 36)
    assert cov["catch_all_variance"] == pytest.approx(33 / 36)


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


def test_set_graph_min_edge_share_thins_links_and_density_counts_them():
    # sets 0 and 1 (3 genes each) are joined by one gene-graph edge of their 9 member pairs;
    # sets 1 and 2 by 4 of 9
    si = np.repeat([0, 1, 2], 3)
    gi = np.arange(9)
    edges = np.array([[0, 3], [3, 6], [3, 7], [4, 6], [5, 8]])
    np.testing.assert_array_equal(set_graph(si, gi, 3, edges), [[0, 1], [1, 2]])
    np.testing.assert_array_equal(set_graph(si, gi, 3, edges, min_edge_share=0.2), [[1, 2]])
    assert set_graph(si, gi, 3, edges, min_edge_share=0.5).shape == (0, 2)
    assert graph_density(np.array([[1, 2], [2, 1]]), 3) == pytest.approx(1 / 3)
    assert graph_density(np.zeros((0, 2)), 3) == 0.0
    assert graph_density(np.zeros((0, 2)), 1) == 1.0


def test_select_gene_sets_ranks_sets_by_their_genes_scores_first():
    genes = [f"g{i}" for i in range(100)]
    sets = {
        "big": genes[:60],
        "mid": genes[50:80],
        "signal": genes[90:100],  # few genes: never the largest gain in the coverage pass
        "noise": genes[80:90],
    }
    scores = np.zeros(100)
    scores[90:100] = 5.0
    plain = select_gene_sets(sets, genes, 5, 100, max_sets=2)
    assert list(plain) == ["big", "mid"]
    # without scores, or with n_ranked=0, the coverage pass alone
    assert list(select_gene_sets(sets, genes, 5, 100, 2, gene_scores=scores)) == list(plain)
    ranked = select_gene_sets(sets, genes, 5, 100, max_sets=2, gene_scores=scores, n_ranked=1)
    assert list(ranked) == ["signal", "big"]
    # more ranked slots than max_sets: max_sets still holds
    assert len(select_gene_sets(sets, genes, 5, 100, 2, gene_scores=scores, n_ranked=9)) == 2
    with pytest.raises(SCFMInputError, match="one finite value per gene"):
        select_gene_sets(sets, genes, 5, 100, 2, gene_scores=scores[:10], n_ranked=1)
    bad = scores.copy()
    bad[0] = np.nan
    with pytest.raises(SCFMInputError, match="one finite value per gene"):
        select_gene_sets(sets, genes, 5, 100, 2, gene_scores=bad, n_ranked=1)


def test_go_gene_sets_propagate_genes_up_is_a_and_part_of(monkeypatch):
    import scfm_adapt.datasets as ds

    g2g = pd.DataFrame(
        {
            "symbol": ["A", "B", "C", "D"],
            "go_id": ["GO:2", "GO:3", "GO:4", "GO:5"],
            "ontology": "BP",
        }
    )
    # GO:2 is_a GO:1, GO:3 part of GO:2, GO:4 only regulates GO:1 (not propagated),
    # GO:5 is_a GO:3 (two levels below GO:2)
    terms = pd.DataFrame(
        {
            "go_id": ["GO:1", "GO:2", "GO:3", "GO:4", "GO:5"],
            "ontology": "BP",
            "term": ["root", "two", "three", "four", "five"],
            "parent_go_id": ["", "GO:1", "GO:2", "GO:1", "GO:3"],
            "relationship": ["", "isa", "part of", "regulates", "isa"],
        }
    )
    monkeypatch.setattr(ds, "go_gene2go", lambda path=None: g2g)
    monkeypatch.setattr(ds, "go_terms", lambda path=None: terms)
    direct = go_gene_sets("BP")
    assert direct == {
        "GO:2 two": ["A"],
        "GO:3 three": ["B"],
        "GO:4 four": ["C"],
        "GO:5 five": ["D"],
    }
    full = go_gene_sets("BP", propagate=True)
    assert full["GO:1 root"] == ["A", "B", "D"]
    assert full["GO:2 two"] == ["A", "B", "D"]
    assert full["GO:3 three"] == ["B", "D"]
    assert full["GO:4 four"] == ["C"]


def test_set_components_give_the_mean_then_the_principal_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * 0.01
    t = rng.normal(size=200)
    x[:, 0] += t  # genes 0 and 1 rise together: set 0's main axis
    x[:, 1] += t
    si = np.array([0, 0, 0, 1, 1])
    gi = np.array([0, 1, 2, 3, 4])
    w = set_components(x, si, gi, n_sets=2, n_channels=3)
    np.testing.assert_allclose(w[:3, 0], 3**-0.5)
    np.testing.assert_allclose(w[:3, 1], [2**-0.5, 2**-0.5, 0.0], atol=0.02)
    np.testing.assert_allclose(np.linalg.norm(w[:3, 2]), 1.0)  # the second axis
    assert w[3:, 2].tolist() == [0.0, 0.0]  # two members: one axis only
    const = np.ones((10, 5))
    assert np.all(set_components(const, si, gi, 2, 3)[:, 1:] == 0)  # no variance

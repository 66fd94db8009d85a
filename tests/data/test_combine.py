"""Combining h5ad files with different genes over one vocabulary (combine_h5ad)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from conftest import make_adata, write_panels
from scfm_adapt.data import BATCH_GENE_MASKS, combine_h5ad, counts_sha256, file_sha256
from scfm_adapt.errors import InvalidCountsError, SCFMInputError, TooFewGenesError


def test_files_are_aligned_onto_the_union_with_each_files_panel(tmp_path):
    paths, data = write_panels(tmp_path)
    out = combine_h5ad(paths, tmp_path / "all.h5ad", progress=False)
    try:
        assert out.isbacked and out.n_obs == 75
        vocab = list(out.var_names)
        # union in order of first appearance: a's genes, then b's new ones
        assert vocab == [f"gene{j}" for j in range(30)] + [f"gene{j}" for j in range(30, 40)]
        assert list(out.obs["dataset"].cat.categories) == ["a", "b", "c"]
        assert list(out.obs["dataset"]) == ["a"] * 30 + ["b"] * 20 + ["c"] * 25
        assert "cell_type" in out.obs and out.obs_names[0] == "a-cell0"
        x = sparse.csr_matrix(out.X[:]).toarray()
        start = 0
        for name, a in data.items():
            rows = x[start : start + a.n_obs]
            cols = [vocab.index(g) for g in a.var_names]
            np.testing.assert_array_equal(rows[:, cols], a.X.toarray())
            others = np.setdiff1d(np.arange(len(vocab)), cols)
            assert not rows[:, others].any()  # genes the file lacks hold no counts
            observed = np.asarray(out.uns[BATCH_GENE_MASKS]["observed"][name])
            assert observed.sum() == a.n_vars and observed[cols].all()
            src = out.uns["scfm_sources"][name]
            assert int(src["n_cells"]) == a.n_obs
            assert str(src["file_sha256"]) == file_sha256(tmp_path / f"{name}.h5ad")
            start += a.n_obs
        assert out.uns[BATCH_GENE_MASKS]["batch_key"] == "dataset"
    finally:
        out.file.close()


def test_intersection_a_gene_list_and_labels(tmp_path):
    paths, _ = write_panels(tmp_path)
    out = combine_h5ad(
        paths, tmp_path / "i.h5ad", genes="intersection", batch_labels=["x", "y", "z"],
        batch_key="source", progress=False,
    )  # fmt: skip
    try:
        assert list(out.var_names) == [f"gene{j}" for j in range(10, 30, 2)]
        assert set(out.obs["source"]) == {"x", "y", "z"}
        assert all(np.asarray(v).all() for v in out.uns[BATCH_GENE_MASKS]["observed"].values())
    finally:
        out.file.close()
    out = combine_h5ad(
        paths, tmp_path / "l.h5ad", genes=["gene39", "gene0", "gene1", "gene2"],
        min_genes_per_file=0.2, progress=False,
    )  # fmt: skip
    try:
        assert list(out.var_names) == ["gene39", "gene0", "gene1", "gene2"]
        obs = {k: np.asarray(v) for k, v in out.uns[BATCH_GENE_MASKS]["observed"].items()}
        np.testing.assert_array_equal(obs["a"], [False, True, True, True])
        np.testing.assert_array_equal(obs["c"], [False, True, False, True])
    finally:
        out.file.close()


def test_bad_inputs_get_named_errors(tmp_path):
    paths, data = write_panels(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.h5ad"):
        combine_h5ad([*paths, tmp_path / "nope.h5ad"], tmp_path / "o.h5ad", progress=False)
    with pytest.raises(SCFMInputError, match="batch_labels"):
        combine_h5ad(paths, tmp_path / "o.h5ad", batch_labels=["x", "x", "y"], progress=False)
    odd = ["gene31", "gene33", "gene35", "gene37"]  # a measures none of them
    with pytest.raises(TooFewGenesError, match=r"a\.h5ad measures 0 of the 4"):
        combine_h5ad(paths, tmp_path / "o.h5ad", genes=odd, progress=False)
    with pytest.raises(SCFMInputError, match="'donor'"):
        combine_h5ad(paths, tmp_path / "o.h5ad", obs_keys=["donor"], progress=False)
    a = data["a"].copy()
    a.X = a.X * 0.5
    a.write_h5ad(tmp_path / "half.h5ad")
    with pytest.raises(InvalidCountsError, match=r"half\.h5ad"):
        combine_h5ad([paths[1], tmp_path / "half.h5ad"], tmp_path / "o.h5ad", progress=False)
    assert not (tmp_path / "o.h5ad").exists() and not (tmp_path / ".o.h5ad.tmp").exists()
    twice = data["b"].copy()
    twice.var_names = ["gene10", *twice.var_names[:-1]]  # gene10 twice
    twice.write_h5ad(tmp_path / "twice.h5ad")
    with pytest.raises(SCFMInputError, match=r"twice\.h5ad names 1 gene\(s\) more than once"):
        combine_h5ad([paths[0], tmp_path / "twice.h5ad"], tmp_path / "o.h5ad", progress=False)
    combine_h5ad(paths, tmp_path / "o.h5ad", progress=False).file.close()
    with pytest.raises(FileExistsError, match="overwrite"):
        combine_h5ad(paths, tmp_path / "o.h5ad", progress=False)


def test_counts_checksum_ignores_storage_but_not_values():
    x = make_adata(n_cells=20).X
    assert counts_sha256(x) == counts_sha256(x.toarray()) == counts_sha256(x.tocsc())
    y = x.toarray()
    y[3, 4] += 1
    assert counts_sha256(y) != counts_sha256(x)
    assert counts_sha256(x[:, :-1]) != counts_sha256(x)


def test_ensembl_ids_are_mapped_to_symbols_and_collisions_refused(tmp_path, shared_data):
    """gene_ids="symbol": a file naming genes by Ensembl id (versions dropped) lines up
    with one naming them by symbol; two ids of one symbol are a named error."""
    from scfm_adapt.datasets import go_gene_ids

    table = go_gene_ids().dropna(subset=["ensembl", "symbol"])
    table = table.drop_duplicates("ensembl").drop_duplicates("symbol").head(30)
    sym, ens = list(table["symbol"]), list(table["ensembl"])
    a = make_adata(n_cells=20, n_genes=30, seed=0)
    a.var_names = sym
    b = make_adata(n_cells=20, n_genes=30, seed=1)
    b.var_names = [f"{e}.7" for e in ens]
    a.write_h5ad(tmp_path / "sym.h5ad")
    b.write_h5ad(tmp_path / "ens.h5ad")
    paths = [tmp_path / "sym.h5ad", tmp_path / "ens.h5ad"]
    out = combine_h5ad(paths, tmp_path / "o.h5ad", gene_ids="symbol", progress=False)
    try:
        assert list(out.var_names) == sym
        np.testing.assert_array_equal(sparse.csr_matrix(out.X[20:]).toarray(), b.X.toarray())
    finally:
        out.file.close()
    all_ids = go_gene_ids().dropna(subset=["ensembl", "symbol"])
    many = all_ids[all_ids["symbol"].duplicated(keep=False)].drop_duplicates("ensembl")
    pair = many.groupby("symbol")["ensembl"].apply(list)
    pair = pair[pair.map(len) > 1].iloc[0][:2]
    c = make_adata(n_cells=10, n_genes=2, seed=2)
    c.var_names = pair
    c.write_h5ad(tmp_path / "two.h5ad")
    with pytest.raises(SCFMInputError, match="after mapping to gene_ids='symbol'"):
        combine_h5ad([tmp_path / "two.h5ad"], tmp_path / "p.h5ad", gene_ids="symbol")

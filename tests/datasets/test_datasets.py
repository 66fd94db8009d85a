"""Tests of scfm_adapt.datasets: built-in data, shared-data loaders, resolution, downloads."""

from __future__ import annotations

import gzip
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scfm_adapt as sfa
import scfm_adapt.datasets as ds
from scfm_adapt.datasets import _cellbench, _go, _kang, _norman, _paths
from scfm_adapt.datasets._counts import _counts_from_lognorm

REPO = Path(__file__).parents[2]


def _shared_dir() -> Path | None:
    env = os.environ.get(ds.ENV_VAR)
    p = Path(env) if env else REPO.parent / "shared" / "data"
    return p.resolve() if p.is_dir() else None


SHARED = _shared_dir()
_REASON = (
    f"real data sets absent: set ${ds.ENV_VAR} or provide ../shared/data beside the repository"
)


def needs_data(f):
    """Mark a test as needing the shared data folder, skipping it with a reason when absent."""
    return pytest.mark.data(pytest.mark.skipif(SHARED is None, reason=_REASON)(f))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No data folder, an empty cache, and a working directory with no ../shared/data."""
    empty = tmp_path / "data"
    empty.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv(ds.ENV_VAR, str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    return tmp_path


@pytest.fixture
def shared(monkeypatch):
    monkeypatch.setenv(ds.ENV_VAR, str(SHARED))
    return SHARED


def _is_counts(X) -> bool:
    v = X.data if sp.issparse(X) else np.asarray(X).ravel()
    return bool(np.all(v >= 0) and np.all(v == np.rint(v)))


# --------------------------------------------------------------------------- built-in pbmc68k
def test_pbmc68k_offline(isolated):
    adata = ds.pbmc68k()
    assert adata.shape == (700, 765)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert _is_counts(adata.X)
    assert adata.var_names.is_unique
    for k in ("bulk_labels", "phase", "louvain", "n_counts"):
        assert k in adata.obs
    assert adata.obs["bulk_labels"].nunique() == 10
    # every cell has counts, and the minimum non-zero count of a cell is 1
    sums = np.asarray(adata.X.sum(1)).ravel()
    assert sums.min() > 0
    assert adata.X.data.min() == 1
    # counts cover only 765 of the original genes: 11-28 % of the original library size
    frac = sums / adata.obs["n_counts"].to_numpy()
    assert 0.10 < frac.min() and frac.max() < 0.30
    # normalising the counts with n_counts gives back the stored log values (3 decimals)
    lognorm = adata.layers["lognorm"]
    assert (lognorm != 0).nnz == (adata.X != 0).nnz
    n = adata.obs["n_counts"].to_numpy()[:, None]
    redo = np.log1p(adata.X.toarray() / n * 1e4)
    assert np.abs(redo - lognorm.toarray()).max() <= 5.01e-4


@needs_data
def test_pbmc68k_equals_shared_counts_file(isolated):
    import anndata as ad

    ref = ad.read_h5ad(SHARED / "pbmc68k_reduced_counts.h5ad")
    adata = ds.pbmc68k()
    assert (adata.obs_names == ref.obs_names).all()
    assert (adata.var_names == ref.var_names).all()
    assert (adata.X != ref.X).nnz == 0
    assert (adata.layers["lognorm"] != ref.layers["lognorm"]).nnz == 0
    assert adata.obs[ref.obs.columns].equals(ref.obs)


# --------------------------------------------------------------------------- count recovery
def test_recovery_round_trip_synthetic():
    rng = np.random.default_rng(0)
    counts = sp.random(50, 80, density=0.3, random_state=1, format="csr")
    counts.data = rng.integers(1, 300, counts.nnz).astype(np.float64)
    counts.data[0] = 1
    totals = np.asarray(counts.sum(1)).ravel() + rng.integers(0, 5000, 50)  # genes dropped
    lognorm = sp.csr_matrix(counts.multiply(1e4 / totals[:, None]))
    lognorm.data = np.log1p(lognorm.data).astype(np.float32)
    got = _counts_from_lognorm(lognorm, totals)
    assert (got != counts).nnz == 0
    # stored with 3 decimals: exact recovery needs the matching tolerance
    rounded = lognorm.copy()
    rounded.data = np.round(rounded.data, 3)
    assert (_counts_from_lognorm(rounded, totals, atol_log=5.01e-4) != counts).nnz == 0
    with pytest.raises(ValueError, match="not integral"):
        _counts_from_lognorm(rounded, totals, atol_log=1e-5)


def test_recovery_rejects_wrong_totals(isolated):
    src = ds._pbmc68k._source()
    with pytest.raises(ValueError, match="could not be recovered exactly"):
        _counts_from_lognorm(src.raw.X, src.obs["n_counts"].to_numpy() * 1.01, atol_log=5.01e-4)


@needs_data
def test_recovery_infers_totals_on_norman(shared):
    adata = ds.norman2019()
    got = _counts_from_lognorm(adata.layers["lognorm"], None)
    assert (got != adata.X).nnz == 0


# --------------------------------------------------------------------------- shared loaders
LOADERS = {
    "kang2018_ifnb": (ds.kang2018_ifnb, {}, (1556, 1267), ("group_id", "cluster_id", "sample_id")),
    "kang2018_ctrl": (ds.kang2018_ctrl, {}, (12261, 1287), ("cluster_id", "sample_id")),
    "norman2019": (ds.norman2019, {}, (5961, 500), ("condition", "perturbation", "dose")),
    "norman19": (ds.norman2019, {"dataset": "norman19"}, (3375, 500), ("condition",)),
    "cellbench": (ds.cellbench, {}, (499, 15073), ("cell_line_demuxlet", "protocol_batch")),
    "citeseq10k": (ds.citeseq_pbmc, {"which": "10k"}, (200, 16727), ("n_counts",)),
    "citeseq5k": (ds.citeseq_pbmc, {"which": "5k"}, (200, 16581), ("n_counts",)),
}


@needs_data
@pytest.mark.parametrize("name", list(LOADERS))
def test_shared_loader_shapes(shared, name):
    loader, kwargs, shape, obs_keys = LOADERS[name]
    adata = loader(**kwargs)
    assert adata.shape == shape
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    assert _is_counts(adata.X)
    for k in obs_keys:
        assert k in adata.obs


@needs_data
def test_shared_loader_details(shared):
    kang = ds.kang2018_ifnb()
    assert set(kang.obs["group_id"]) == {"ctrl", "stim"}
    assert kang.obs["cluster_id"].nunique() == 5 and kang.obs["sample_id"].nunique() == 4
    ctrl = ds.kang2018_ctrl()
    assert ctrl.obs["cluster_id"].nunique() == 8 and ctrl.obs["sample_id"].nunique() == 8
    norman = ds.norman2019("norman19")
    assert set(norman.obs["dataset"]) == {"norman19"}
    assert list(norman.obs["dataset"].cat.categories) == ["norman19"]
    assert {"1", "1+1"} == set(norman.obs["dose"].astype(str))
    assert "KLF1+MAP2K6" in set(norman.obs["condition"].astype(str))
    with pytest.raises(ValueError, match="dataset="):
        ds.norman2019("nope")
    cb = ds.cellbench()
    assert set(cb.obs["protocol_batch"]) == {"CELseq2", "Dropseq"}
    for which, n_prot in (("10k", 14), ("5k", 29)):
        cs = ds.citeseq_pbmc(which)
        assert cs.obsm["protein_expression"].shape == (200, n_prot)
        assert len(cs.uns["protein_names"]) == n_prot
        assert _is_counts(cs.obsm["protein_expression"])
    with pytest.raises(ValueError, match="which="):
        ds.citeseq_pbmc("3k")


@needs_data
def test_multiome(shared):
    mdata = ds.multiome()
    assert mdata.n_obs == 1000
    assert mdata["rna"].shape == (1000, 45) and mdata["atac"].shape == (1000, 174)
    assert _is_counts(mdata["rna"].X) and _is_counts(mdata["atac"].X)


@needs_data
def test_go_tables(shared):
    go = ds.go_annotations()
    assert go["gene2go"].shape == (348116, 5)
    assert list(go["gene2go"].columns) == ["entrez", "symbol", "go_id", "evidence", "ontology"]
    assert go["gene2go"]["entrez"].dtype == np.int64
    assert set(go["gene2go"]["ontology"]) == {"BP", "CC", "MF"}
    assert list(go["terms"].columns) == [
        "go_id",
        "ontology",
        "term",
        "parent_go_id",
        "relationship",
    ]
    assert go["terms"]["go_id"].str.startswith("GO:").all()
    assert list(go["gene_ids"].columns) == ["entrez", "symbol", "ensembl"]
    assert go["gene_ids"].shape == (81120, 3)


@needs_data
def test_explicit_path_overrides_lookup(isolated):
    f = SHARED / "kang2018_ifnb_muscat.h5ad"
    assert ds.kang2018_ifnb(path=f).shape == (1556, 1267)
    assert ds.kang2018_ifnb(path=SHARED).shape == (1556, 1267)  # a folder works too
    assert ds.go_terms(path=SHARED / "go").shape[1] == 5


# --------------------------------------------------------------------------- resolution
def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path))
    assert ds.data_dir() == tmp_path.resolve()
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "missing"))
    assert ds.data_dir() is None  # a set variable is never silently overridden
    monkeypatch.delenv(ds.ENV_VAR)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert ds.data_dir() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.chdir(tmp_path / "shared" / "data")  # no ../shared/data from here
    assert ds.data_dir() is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ds.cache_dir() == tmp_path / "xdg" / "scfm_adapt"


MISSING = {
    "kang2018_ifnb": (ds.kang2018_ifnb, "kang2018_ifnb_muscat.h5ad"),
    "kang2018_ctrl": (ds.kang2018_ctrl, "kang2018_ctrl_8donors.h5ad"),
    "norman2019": (ds.norman2019, "norman2019_mcfaline2023_perturbench_devel.h5ad"),
    "cellbench": (ds.cellbench, "cellbench_3cellline_2protocols.h5ad"),
    "citeseq_pbmc": (ds.citeseq_pbmc, "citeseq_pbmc10k_200cells.h5ad"),
    "multiome": (ds.multiome, "multiome_rna_atac_1000cells.h5mu"),
    "go_gene2go": (ds.go_gene2go, "human_gene2go_orgHsegdb_3.16.tsv.gz"),
    "go_terms": (ds.go_terms, "go_terms_and_parents_GOdb_3.16.tsv.gz"),
    "go_gene_ids": (ds.go_gene_ids, "human_gene_ensembl_symbol_orgHsegdb_3.16.tsv.gz"),
    "go_annotations": (ds.go_annotations, "human_gene2go_orgHsegdb_3.16.tsv.gz"),
}


@pytest.mark.parametrize("name", list(MISSING))
def test_missing_file_error_names_the_fixes(isolated, name):
    loader, filename = MISSING[name]
    with pytest.raises(FileNotFoundError) as err:
        loader()
    msg = str(err.value)
    assert filename in msg
    assert "SCFM_ADAPT_DATA" in msg
    assert "download=True" in msg
    assert not (isolated / "cache").exists()  # nothing downloaded without download=True


# --------------------------------------------------------------------------- download code
def test_fetch_downloads_file_url_into_cache(isolated):
    src = isolated / "src.txt"
    src.write_text("hello")
    url = src.as_uri()
    with pytest.raises(FileNotFoundError, match="download=True"):
        _paths._fetch("sub/x.txt", url)
    with pytest.raises(OSError, match="Checksum mismatch"):
        _paths._fetch("sub/x.txt", url, download=True, sha256="0" * 64)
    assert not list((isolated / "cache" / "scfm_adapt" / "sub").iterdir())  # no partial file
    got = _paths._fetch("sub/x.txt", url, download=True)
    assert got == isolated / "cache" / "scfm_adapt" / "sub" / "x.txt"
    assert got.read_text() == "hello"
    src.unlink()
    assert _paths._fetch("sub/x.txt", url) == got  # found in the cache, no download


def test_kang_download_builds_from_source(isolated, monkeypatch):
    import anndata as ad

    rng = np.random.default_rng(0)
    n = 600
    obs = pd.DataFrame(
        {
            "label": rng.choice(["ctrl", "stim"], n),
            "cell_type": rng.choice([*_kang._IFNB_CLUSTERS, "NK cells"], n),
            "replicate": rng.choice(["patient_101", "patient_107", "patient_1015"], n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    X = sp.random(n, 30, density=0.3, random_state=0, format="csr", dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    src = isolated / "kang.h5ad"
    ad.AnnData(X=X, obs=obs).write_h5ad(src)
    monkeypatch.setattr(_kang, "KANG_URL", src.as_uri())

    ctrl = ds.kang2018_ctrl(download=True)
    assert ctrl.n_obs == (obs["label"] == "ctrl").sum()
    assert set(ctrl.obs["sample_id"]) == {101, 107, 1015}
    ifnb = ds.kang2018_ifnb(download=True)
    assert set(ifnb.obs["sample_id"]) <= {"ctrl101", "ctrl107", "stim101", "stim107"}
    assert ifnb.obs.groupby(["cluster_id", "sample_id"], observed=True).size().max() <= 100
    assert "NK cells" not in set(ifnb.obs["cluster_id"])
    assert (isolated / "cache" / "scfm_adapt" / _kang.IFNB_FILE).is_file()


def test_norman_download_recovers_counts(isolated, monkeypatch):
    import anndata as ad

    counts = sp.random(40, 12, density=0.5, random_state=2, format="csr", dtype=np.float32)
    counts.data = np.ceil(counts.data * 20)
    counts = sp.csr_matrix(np.column_stack([np.ones(40, np.float32), counts.toarray()]))
    totals = np.asarray(counts.sum(1)).ravel() + 100
    lognorm = sp.csr_matrix(counts.multiply(1e4 / totals[:, None]), dtype=np.float32)
    lognorm.data = np.log1p(lognorm.data)
    obs = pd.DataFrame(
        {k: ["x"] * 40 for k in ("condition", "perturbation", "cell_type", "dose")},
        index=[f"c{i}" for i in range(40)],
    )
    obs["dataset"] = ["norman19"] * 20 + ["mcfaline23"] * 20
    src = isolated / "devel.h5ad"
    ad.AnnData(X=lognorm, obs=obs).write_h5ad(src)
    monkeypatch.setattr(_norman, "PERTURBENCH_DEVEL_URL", src.as_uri())
    adata = ds.norman2019("norman19", download=True)
    assert adata.shape == (20, 13)
    assert (adata.X != counts[:20]).nnz == 0


def test_cellbench_download_builds_from_csv(isolated, monkeypatch):

    base = isolated / "csv"
    base.mkdir()
    rng = np.random.default_rng(3)
    for stem, genes, cells in (
        ("sc_celseq2", ["g1", "g2", "g3"], ["A1", "A2"]),
        ("sc_dropseq", ["g2", "g3", "g4"], ["AAAC", "GGGT", "TTTT"]),
    ):
        c = pd.DataFrame(rng.integers(0, 9, (3, len(cells))), index=genes, columns=cells)
        c.to_csv(base / f"{stem}.count.csv.gz")
        meta = pd.DataFrame({"cell_line_demuxlet": "H1975", "demuxlet_cls": "SNG"}, index=cells[:2])
        meta.to_csv(base / f"{stem}.metadata.csv.gz")
    monkeypatch.setattr(_cellbench, "CELLBENCH_URL", base.as_uri() + "/")
    adata = ds.cellbench(download=True)
    assert adata.shape == (4, 2)
    assert list(adata.var_names) == ["g2", "g3"]
    assert list(adata.obs_names) == ["CELseq2_A1", "CELseq2_A2", "Dropseq_AAAC", "Dropseq_GGGT"]
    assert list(adata.obs["protocol_batch"]) == ["CELseq2"] * 2 + ["Dropseq"] * 2


def _tarball(tmp: Path, name: str, member: str, schema: str) -> Path:
    db = tmp / Path(member).name
    with sqlite3.connect(db) as con:
        con.executescript(schema)
    con.close()
    tgz = tmp / name
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(db, arcname=member)
    db.unlink()
    return tgz


def test_go_download_builds_from_sqlite(isolated, monkeypatch):
    org = _tarball(
        isolated,
        "org.tar.gz",
        "org.Hs.eg.db/inst/extdata/org.Hs.eg.sqlite",
        """
        CREATE TABLE genes (_id INTEGER PRIMARY KEY, gene_id TEXT);
        CREATE TABLE gene_info (_id INTEGER, gene_name TEXT, symbol TEXT);
        CREATE TABLE ensembl (_id INTEGER, ensembl_id TEXT);
        CREATE TABLE go (_id INTEGER, go_id TEXT, evidence TEXT, ontology TEXT);
        INSERT INTO genes VALUES (1, '2'), (2, '10');
        INSERT INTO gene_info VALUES (1, 'alpha-2-macroglobulin', 'A2M'), (2, 'x', 'NAT2');
        INSERT INTO ensembl VALUES (1, 'ENSG00000175899');
        INSERT INTO go VALUES (1, 'GO:0001553', 'IEA', 'BP'), (2, 'GO:0005737', 'IDA', 'CC');
        """,
    )
    godb = _tarball(
        isolated,
        "go.tar.gz",
        "GO.db/inst/extdata/GO.sqlite",
        """
        CREATE TABLE go_term (_id INTEGER PRIMARY KEY, go_id TEXT, term TEXT, ontology TEXT);
        CREATE TABLE go_bp_parents (_id INTEGER, _parent_id INTEGER, relationship_type TEXT);
        CREATE TABLE go_cc_parents (_id INTEGER, _parent_id INTEGER, relationship_type TEXT);
        CREATE TABLE go_mf_parents (_id INTEGER, _parent_id INTEGER, relationship_type TEXT);
        INSERT INTO go_term VALUES (1, 'GO:0000001', 'mitochondrion inheritance', 'BP'),
                                   (2, 'GO:0048308', 'organelle inheritance', 'BP');
        INSERT INTO go_bp_parents VALUES (1, 2, 'isa');
        """,
    )
    monkeypatch.setattr(_go, "ORG_HS_EG_DB_URL", org.as_uri())
    monkeypatch.setattr(_go, "GO_DB_URL", godb.as_uri())
    go = ds.go_annotations(download=True)
    assert go["gene2go"].to_dict("list") == {
        "entrez": [2, 10],
        "symbol": ["A2M", "NAT2"],
        "go_id": ["GO:0001553", "GO:0005737"],
        "evidence": ["IEA", "IDA"],
        "ontology": ["BP", "CC"],
    }
    assert go["terms"].iloc[0].tolist() == [
        "GO:0000001",
        "BP",
        "mitochondrion inheritance",
        "GO:0048308",
        "isa",
    ]
    assert go["gene_ids"]["ensembl"].isna().tolist() == [False, True]
    with gzip.open(isolated / "cache" / "scfm_adapt" / _go.TERMS_FILE, "rt") as fh:
        assert fh.readline().strip().split("\t")[0] == "go_id"


def test_loader_rejects_non_count_data(isolated):
    import anndata as ad

    obs = pd.DataFrame({"cluster_id": ["a", "b"], "sample_id": [1, 2]}, index=["c0", "c1"])
    f = isolated / "lognorm.h5ad"
    ad.AnnData(X=np.array([[0.5, 1.0], [2.0, 0.0]], np.float32), obs=obs).write_h5ad(f)
    with pytest.raises(ValueError, match="integer counts"):
        ds.kang2018_ctrl(path=f)


# --------------------------------------------------------------------------- import cost
def test_import_is_light():
    code = (
        "import sys, scfm_adapt.datasets as d; d.data_dir(); "
        "print(','.join(m for m in ('scanpy', 'anndata', 'mudata', 'torch', 'pandas') "
        "if m in sys.modules))"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


# ------------------------------------------------------------------ real data
def test_go_gene_features_real(shared_data):
    f = sfa.datasets.go_gene_features(["MAP4K3", "MAP4K5", "HK2", "NOT_A_GENE"])
    assert list(f.index) == ["MAP4K3", "MAP4K5", "HK2"]
    assert np.allclose(np.linalg.norm(f.to_numpy(), axis=1), 1.0, atol=1e-5)
    v = f.to_numpy()
    assert v[0] @ v[1] > v[0] @ v[2]  # two MAP4 kinases are closer than a hexokinase

"""Gene Ontology tables for human genes (Bioconductor org.Hs.eg.db / GO.db 3.16)."""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path

from ._paths import _fetch, _raw_download, cache_dir

GENE2GO_FILE = "go/human_gene2go_orgHsegdb_3.16.tsv.gz"
TERMS_FILE = "go/go_terms_and_parents_GOdb_3.16.tsv.gz"
GENE_IDS_FILE = "go/human_gene_ensembl_symbol_orgHsegdb_3.16.tsv.gz"

#: Bioconductor 3.16 annotation packages; their SQLite databases are what Debian packages as
#: r-bioc-org.hs.eg.db and r-bioc-go.db (the README's source). GO data: CC-BY-4.0.
ORG_HS_EG_DB_URL = (
    "https://bioconductor.org/packages/3.16/data/annotation/src/contrib/org.Hs.eg.db_3.16.0.tar.gz"
)
GO_DB_URL = "https://bioconductor.org/packages/3.16/data/annotation/src/contrib/GO.db_3.16.0.tar.gz"

_GENE2GO_SQL = """
SELECT g.gene_id AS entrez, i.symbol AS symbol, go.go_id AS go_id,
       go.evidence AS evidence, go.ontology AS ontology
FROM {go_table} AS go
JOIN genes AS g ON g._id = go._id
JOIN gene_info AS i ON i._id = go._id
"""
_GENE_IDS_SQL = """
SELECT g.gene_id AS entrez, i.symbol AS symbol, e.ensembl_id AS ensembl
FROM genes AS g
JOIN gene_info AS i ON i._id = g._id
LEFT JOIN ensembl AS e ON e._id = g._id
"""
_TERMS_SQL = """
SELECT t.go_id AS go_id, t.ontology AS ontology, t.term AS term,
       p.go_id AS parent_go_id, r.relationship_type AS relationship
FROM go_{ont}_parents AS r
JOIN go_term AS t ON t._id = r._id
JOIN go_term AS p ON p._id = r._parent_id
"""


def _sqlite_from_tarball(url: str, tarball: str, member_suffix: str) -> Path:
    """Download a Bioconductor package tarball (once) and extract its SQLite database."""
    import tarfile

    out = cache_dir() / "raw" / member_suffix
    if out.is_file():
        return out
    tgz = _raw_download(url, tarball)
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
        if not members:
            raise ValueError(f"{url}: no file ending in {member_suffix!r} in the tarball.")
        src = tar.extractfile(members[0])
        tmp = out.with_name(f".part-{out.name}")
        with closing(src), open(tmp, "wb") as fh:
            fh.write(src.read())
        os.replace(tmp, out)
    return out


def _query(db: Path, sql: str):
    import sqlite3

    import pandas as pd

    with closing(sqlite3.connect(db)) as con:
        return pd.read_sql_query(sql, con)


def _org_db() -> Path:
    return _sqlite_from_tarball(ORG_HS_EG_DB_URL, "org.Hs.eg.db_3.16.0.tar.gz", "org.Hs.eg.sqlite")


def _go_db() -> Path:
    return _sqlite_from_tarball(GO_DB_URL, "GO.db_3.16.0.tar.gz", "GO.sqlite")


def _tables(db: Path) -> set[str]:
    import sqlite3

    with closing(sqlite3.connect(db)) as con:
        rows = con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
        return {r[0] for r in rows}


def _build_gene2go(dest: Path, db: Path | None = None) -> None:
    import pandas as pd

    db = db or _org_db()
    if "go" in _tables(db):
        df = _query(db, _GENE2GO_SQL.format(go_table="go"))
    else:  # older schema: one table per ontology
        parts = []
        for ont in ("BP", "CC", "MF"):
            sql = _GENE2GO_SQL.format(go_table=f"go_{ont.lower()}").replace(
                "go.ontology AS ontology", f"'{ont}' AS ontology"
            )
            parts.append(_query(db, sql))
        df = pd.concat(parts, ignore_index=True)
    df["entrez"] = df["entrez"].astype("int64")
    df.sort_values(["entrez", "go_id", "evidence"], kind="stable").to_csv(
        dest, sep="\t", index=False, compression="gzip"
    )


def _build_gene_ids(dest: Path, db: Path | None = None) -> None:
    df = _query(db or _org_db(), _GENE_IDS_SQL)
    df["entrez"] = df["entrez"].astype("int64")
    df.sort_values(["entrez", "ensembl"], kind="stable").to_csv(
        dest, sep="\t", index=False, compression="gzip"
    )


def _build_terms(dest: Path, db: Path | None = None) -> None:
    import pandas as pd

    db = db or _go_db()
    df = pd.concat([_query(db, _TERMS_SQL.format(ont=o)) for o in ("bp", "cc", "mf")])
    df.sort_values(["go_id", "parent_go_id"], kind="stable").to_csv(
        dest, sep="\t", index=False, compression="gzip"
    )


def _read_tsv(f: Path, columns: tuple[str, ...]):
    import pandas as pd

    df = pd.read_csv(f, sep="\t", dtype={"entrez": "int64"} if "entrez" in columns else None)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{f}: expected columns {list(columns)}, missing {missing}.")
    return df


def go_gene2go(path: str | os.PathLike | None = None, download: bool = False):
    """Human gene → GO term annotations (Bioconductor org.Hs.eg.db 3.16).

    Parameters
    ----------
    path
        The TSV file (or a folder holding it, or its ``go/`` sub-folder). Default: the data
        folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        If the file is not found, download org.Hs.eg.db (``ORG_HS_EG_DB_URL``, ~90 MB) and
        export the table into ``~/.cache/scfm_adapt/go``.

    Returns
    -------
    pandas.DataFrame
        ~348k rows, columns ``entrez`` (int), ``symbol``, ``go_id`` (``"GO:0008150"``),
        ``evidence`` (code, e.g. ``IDA``, ``IEA``), ``ontology`` (``BP``/``CC``/``MF``).
    """
    f = _fetch(GENE2GO_FILE, ORG_HS_EG_DB_URL, path, download, build=_build_gene2go)
    return _read_tsv(f, ("entrez", "symbol", "go_id", "evidence", "ontology"))


def go_terms(path: str | os.PathLike | None = None, download: bool = False):
    """GO terms with their names, ontologies and parent edges (Bioconductor GO.db 3.16).

    Parameters
    ----------
    path
        The TSV file (or a folder holding it, or its ``go/`` sub-folder). Default: the data
        folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        If the file is not found, download GO.db (``GO_DB_URL``) and export the table into
        ``~/.cache/scfm_adapt/go``.

    Returns
    -------
    pandas.DataFrame
        One row per (term, parent) edge, ~86k rows over ~44k terms with a parent; columns
        ``go_id``, ``ontology`` (``BP``/``CC``/``MF``), ``term`` (name), ``parent_go_id``,
        ``relationship`` (``isa``, ``part of``, ``regulates``, ``negatively regulates``,
        ``positively regulates``).
    """
    f = _fetch(TERMS_FILE, GO_DB_URL, path, download, build=_build_terms)
    return _read_tsv(f, ("go_id", "ontology", "term", "parent_go_id", "relationship"))


def go_gene_ids(path: str | os.PathLike | None = None, download: bool = False):
    """Human gene identifiers: Entrez id ↔ symbol ↔ Ensembl id (org.Hs.eg.db 3.16).

    Parameters
    ----------
    path
        The TSV file (or a folder holding it, or its ``go/`` sub-folder). Default: the data
        folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        If the file is not found, download org.Hs.eg.db (``ORG_HS_EG_DB_URL``) and export the
        table into ``~/.cache/scfm_adapt/go``.

    Returns
    -------
    pandas.DataFrame
        ~81k rows, columns ``entrez`` (int), ``symbol``, ``ensembl`` (``ENSG...``; missing for
        about half the rows; a gene with several Ensembl ids has several rows).
    """
    f = _fetch(GENE_IDS_FILE, ORG_HS_EG_DB_URL, path, download, build=_build_gene_ids)
    return _read_tsv(f, ("entrez", "symbol", "ensembl"))


def go_annotations(path: str | os.PathLike | None = None, download: bool = False) -> dict:
    """All three GO tables: see :func:`go_gene2go`, :func:`go_terms`, :func:`go_gene_ids`.

    Parameters
    ----------
    path
        A folder holding the three files (or their ``go/`` sub-folder). Default: the data
        folder (``$SCFM_ADAPT_DATA`` or ``../shared/data``), then the download cache.
    download
        Download whatever is missing (see the three functions).

    Returns
    -------
    dict of str to pandas.DataFrame
        ``{"gene2go": ..., "terms": ..., "gene_ids": ...}``.
    """
    return {
        "gene2go": go_gene2go(path, download),
        "terms": go_terms(path, download),
        "gene_ids": go_gene_ids(path, download),
    }


_FEATURE_CACHE: dict[tuple, object] = {}


def go_gene_features(
    genes=None,
    n_components: int = 64,
    ontologies: tuple[str, ...] = ("BP", "CC", "MF"),
    min_term_size: int = 5,
    max_term_size: int = 1000,
    seed: int = 0,
    path: str | os.PathLike | None = None,
    download: bool = False,
):
    """A feature vector per human gene (symbol) from its GO annotations.

    The gene x term incidence matrix (every annotation, any evidence code) over terms
    annotated to between ``min_term_size`` and ``max_term_size`` genes, each term weighted
    by its inverse document frequency ``log(n_genes / n_genes_with_term)``, is reduced to
    ``n_components`` dimensions with a truncated SVD (fitted on every annotated gene, so a
    gene's vector does not depend on which genes are requested), and each row is scaled to
    unit length. Genes with similar annotations get nearby vectors: that is how a model
    embeds the perturbation of a gene it never saw perturbed.

    Parameters
    ----------
    genes
        Symbols to return (in this order); ``None`` returns every annotated gene. Genes
        without an annotation in the kept terms are left out (the caller can tell which
        are missing from the index).
    n_components
        Length of the vectors.
    ontologies
        GO ontologies to use: ``"BP"``, ``"CC"``, ``"MF"``.
    min_term_size, max_term_size
        Terms annotated to fewer or more genes are ignored (too specific to generalise, or
        too broad to inform).
    seed
        Seed of the randomized SVD.
    path, download
        Where the GO tables are (see :func:`go_gene2go`).

    Returns
    -------
    pandas.DataFrame
        Genes (symbols) x ``n_components`` float32, rows of unit norm.
    """
    import numpy as np
    import pandas as pd
    from scipy import sparse
    from sklearn.decomposition import TruncatedSVD

    key = (tuple(ontologies), n_components, min_term_size, max_term_size, seed, str(path))
    full = _FEATURE_CACHE.get(key)
    if full is None:
        g2g = go_gene2go(path, download)
        g2g = g2g[g2g["ontology"].isin(list(ontologies))]
        pairs = g2g[["symbol", "go_id"]].dropna().drop_duplicates()
        size = pairs.groupby("go_id")["symbol"].transform("size")
        pairs = pairs[(size >= min_term_size) & (size <= max_term_size)]
        if pairs.empty:
            raise ValueError("No GO term is left after the size filters; widen them.")
        gi, gene_names = pd.factorize(pairs["symbol"], sort=True)
        ti, _ = pd.factorize(pairs["go_id"], sort=True)
        m = sparse.csr_matrix(
            (np.ones(len(pairs), np.float32), (gi, ti)), shape=(gene_names.size, ti.max() + 1)
        )
        df = np.asarray(m.sum(0)).ravel()
        m = m @ sparse.diags(np.log(gene_names.size / df).astype(np.float32))
        k = int(min(n_components, min(m.shape) - 1))
        emb = TruncatedSVD(n_components=k, random_state=seed).fit_transform(m)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        full = pd.DataFrame(
            emb.astype(np.float32),
            index=pd.Index(gene_names.astype(str), name="symbol"),
            columns=[f"go_{i}" for i in range(k)],
        )
        _FEATURE_CACHE[key] = full
    if genes is None:
        return full.copy()
    genes = [str(g) for g in genes]
    return full.loc[[g for g in genes if g in full.index]].copy()

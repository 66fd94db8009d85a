"""Gene sets and gene graphs for pathway tokens and graph-masked attention.

Gene sets come from the GO tables (:func:`go_gene_sets`), a GMT file (:func:`read_gmt`) or
a dict; :func:`select_gene_sets` fits them to a data set's genes. Graphs are undirected edge
arrays over gene (or set) indices: from GO (:func:`go_gene_graph`), from a user's matrix or
edge list (:func:`as_gene_graph`), and lifted from genes to sets (:func:`set_graph`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import GeneMismatchError, SCFMInputError

#: Name of the catch-all token of genes in no selected set.
OTHER_GENES = "(genes in no set)"


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Gene sets of a GMT file: one set a line, ``name<TAB>description<TAB>gene<TAB>...``.

    Raises
    ------
    SCFMInputError
        When a line has no genes or a name repeats.
    """
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            fields = [x.strip() for x in line.rstrip("\n").split("\t")]
            if not fields or not fields[0]:
                continue
            if len(fields) < 3 or not any(fields[2:]):
                raise SCFMInputError(
                    f"{path}, line {n}: a GMT line is 'name<TAB>description<TAB>genes...'; "
                    f"this one has no genes ({line[:60]!r})."
                )
            if fields[0] in sets:
                raise SCFMInputError(f"{path}, line {n}: the set {fields[0]!r} appears twice.")
            sets[fields[0]] = [g for g in fields[2:] if g]
    if not sets:
        raise SCFMInputError(f"{path} holds no gene set.")
    return sets


def go_gene_sets(
    ontology: str = "BP", path: str | os.PathLike | None = None, propagate: bool = False
) -> dict[str, list[str]]:
    """Every GO term of ``ontology`` with its annotated genes (symbols).

    Keys read ``"GO:0006955 immune response"``. By default a term holds the genes annotated
    to it directly; with ``propagate`` it also holds those of every term below it through
    ``is_a`` and ``part_of`` (GO's true-path rule), so a process includes the genes of its
    subtypes and parts. Regulation terms (``regulates`` links) are not propagated: the
    regulation of a process is not part of it. Size filters and the choice among the ~12k BP
    terms are :func:`select_gene_sets`' job, against a data set's genes.
    """
    from ..datasets import go_gene2go, go_terms

    g2g = go_gene2go(path)
    g2g = g2g[g2g["ontology"] == ontology][["go_id", "symbol"]].dropna().drop_duplicates()
    terms = go_terms(path)
    names = terms.drop_duplicates("go_id").set_index("go_id")["term"]
    direct = {go_id: set(genes.astype(str)) for go_id, genes in g2g.groupby("go_id")["symbol"]}
    if propagate:
        edges = terms[
            (terms["ontology"] == ontology) & terms["relationship"].isin(["isa", "part of"])
        ]
        children: dict[str, list[str]] = {}
        for child, parent in zip(edges["go_id"], edges["parent_go_id"], strict=True):
            children.setdefault(parent, []).append(child)
        full: dict[str, set[str]] = {}

        def genes_below(term: str) -> set[str]:  # iterative post-order: GO is deep
            stack = [(term, False)]
            while stack:
                t, done = stack.pop()
                if t in full:
                    continue
                kids = children.get(t, [])
                if done:
                    acc = set(direct.get(t, ()))
                    for k in kids:
                        acc |= full[k]
                    full[t] = acc
                else:
                    stack.append((t, True))
                    stack.extend((k, False) for k in kids if k not in full)
            return full[term]

        for t in set(direct) | set(children):
            genes_below(t)
        direct = {t: g for t, g in full.items() if g}
    out: dict[str, list[str]] = {}
    for go_id in sorted(direct):
        out[f"{go_id} {names.get(go_id, '')}".strip()] = sorted(direct[go_id])
    return out


def select_gene_sets(
    gene_sets: Mapping[str, Sequence[str]],
    var_names: Sequence[str],
    min_size: int = 10,
    max_size: int = 300,
    max_sets: int | None = 64,
    max_overlap: float = 0.5,
    gene_scores: np.ndarray | None = None,
    n_ranked: int = 0,
) -> dict[str, np.ndarray]:
    """Fit gene sets to a data set: member indices of the sets worth a token.

    Sets are cut to the genes in ``var_names`` and kept when ``min_size <= size <=
    max_size``. When more than ``max_sets`` remain, they are chosen in two passes, each
    skipping sets whose overlap with a chosen one exceeds ``max_overlap`` of the smaller
    (near-duplicates, common among GO parents and children):

    1. with ``gene_scores``, up to ``n_ranked`` sets by the mean score of their members,
       highest first: the pathways the data vary along (scores such as each gene's
       variance, or its response to the perturbations; a small set, such as interferon
       signalling, adds few genes and would lose the second pass);
    2. the rest greedily by how many genes they add that no chosen set covers yet (ties:
       the larger set, then the name).

    Deterministic.

    Returns
    -------
    dict of str to numpy.ndarray
        Set name → sorted gene indices into ``var_names``, in the chosen order.

    Raises
    ------
    GeneMismatchError
        When no set keeps ``min_size`` of the data's genes (wrong species or identifiers).
    SCFMInputError
        When ``gene_scores`` does not have one finite value per gene.
    """
    index = {g: i for i, g in enumerate(map(str, var_names))}
    score = None
    if gene_scores is not None:
        score = np.asarray(gene_scores, dtype=np.float64)
        if score.shape != (len(index),) or not np.isfinite(score).all():
            raise SCFMInputError(
                f"gene_scores has shape {score.shape}; expected one finite value per gene "
                f"({len(index)},)."
            )
    fitted = {}
    for name, genes in gene_sets.items():
        idx = np.unique([index[g] for g in map(str, genes) if g in index]).astype(np.int64)
        if min_size <= idx.size <= max_size:
            fitted[str(name)] = idx
    if not fitted:
        example = next(iter(gene_sets.values()), [])[:3]
        raise GeneMismatchError(
            f"No gene set has between {min_size} and {max_size} of the data's "
            f"{len(index):,} genes (set genes look like {list(example)}, the data's like "
            f"{list(var_names[:3])}). Use the same identifiers (GO sets are gene symbols: "
            "map Ensembl ids with sfa.datasets.go_gene_ids()) or widen min_size/max_size."
        )
    if max_sets is None or len(fitted) <= max_sets:
        return fitted
    chosen: dict[str, np.ndarray] = {}

    def distinct(m: np.ndarray) -> bool:
        return all(
            np.intersect1d(m, c, assume_unique=True).size <= max_overlap * min(m.size, c.size)
            for c in chosen.values()
        )

    if score is not None and n_ranked > 0:
        for name, idx in sorted(fitted.items(), key=lambda kv: (-score[kv[1]].mean(), kv[0])):
            if len(chosen) >= min(n_ranked, max_sets):
                break
            if distinct(idx):
                chosen[name] = idx
    covered = np.zeros(len(index), dtype=bool)
    for idx in chosen.values():
        covered[idx] = True
    candidates = sorted(
        ((n, m) for n, m in fitted.items() if n not in chosen and distinct(m)),
        key=lambda kv: (-kv[1].size, kv[0]),
    )
    while len(chosen) < max_sets and candidates:
        gains = [int((~covered[idx]).sum()) for _, idx in candidates]
        best = int(np.argmax(gains))  # first maximum: the larger set, then the name
        name, idx = candidates.pop(best)
        chosen[name] = idx
        covered[idx] = True
        candidates = [
            (n, m)
            for n, m in candidates
            if np.intersect1d(m, idx, assume_unique=True).size
            <= max_overlap * min(m.size, idx.size)
        ]
    return chosen


def uncovered_genes(sets: Mapping[str, np.ndarray], n_genes: int) -> np.ndarray:
    """Indices of the genes in none of ``sets``."""
    members = [np.asarray(v, dtype=np.int64) for v in sets.values()]
    return np.setdiff1d(np.arange(n_genes), np.concatenate(members) if members else [])


def is_catch_all(name: str) -> bool:
    """Whether a token name is a catch-all of genes in no set (one, or one of several
    residual programmes)."""
    return str(name).startswith(OTHER_GENES)


def memberships(
    sets: Mapping[str, np.ndarray],
    n_genes: int,
    other: bool = True,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Parallel ``(set index, gene index)`` arrays of ``sets``; with ``other``, the genes in
    none go to a last set (so the encoder sees all expression), or, given ``residual``
    (name → gene indices, covering exactly those genes, names starting with
    :data:`OTHER_GENES`), to several last sets."""
    names = list(sets)
    set_idx = [np.full(len(v), i, dtype=np.int64) for i, v in enumerate(sets.values())]
    gene_idx = [np.asarray(v, dtype=np.int64) for v in sets.values()]
    if other:
        rest = uncovered_genes(sets, n_genes)
        groups = dict(residual) if residual else ({OTHER_GENES: rest} if rest.size else {})
        given = np.sort(np.concatenate([np.asarray(v) for v in groups.values()])) if groups else []
        if not np.array_equal(given, rest) or not all(map(is_catch_all, groups)):
            raise ValueError(
                "residual= must split exactly the genes in no set, under names starting with "
                f"{OTHER_GENES!r}."
            )
        for name, idx in groups.items():
            names.append(name)
            set_idx.append(np.full(len(idx), len(names) - 1, dtype=np.int64))
            gene_idx.append(np.asarray(idx, dtype=np.int64))
    return names, np.concatenate(set_idx), np.concatenate(gene_idx)


def residual_programmes(
    x_rest: np.ndarray, rest: np.ndarray, var_names: Sequence[str], n_groups: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Split the genes in no set into ``n_groups`` expression programmes.

    The genes' standardised profiles over the cells are clustered by k-means (scikit-learn,
    ``random_state=seed``), so genes that rise and fall together share a token. Each
    programme is named after its three most variable genes.

    Parameters
    ----------
    x_rest
        Cells × ``rest``: log-normalised expression of those genes (dense; a sample of the
        training cells).
    rest
        Indices of the genes in no set (columns of ``x_rest``).
    var_names
        Gene names.
    n_groups
        Programmes (at most one per gene).

    Returns
    -------
    dict of str to numpy.ndarray
        ``"(genes in no set) j: A, B, C"`` → sorted gene indices, in programme order.
    """
    rest = np.asarray(rest, dtype=np.int64)
    k = int(min(n_groups, rest.size))
    if k <= 1:
        return {OTHER_GENES: rest} if rest.size else {}
    from sklearn.cluster import KMeans

    prof = np.asarray(x_rest, dtype=np.float64).T  # genes × cells
    sd = prof.std(1, keepdims=True)
    z = (prof - prof.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    labels = KMeans(k, n_init=4, random_state=seed).fit_predict(z)
    var = prof.var(1)
    out = {}
    for j in range(k):
        members = rest[labels == j]
        if not members.size:
            continue
        top = members[np.argsort(-var[labels == j], kind="stable")[:3]]
        out[f"{OTHER_GENES} {len(out) + 1}: {', '.join(str(var_names[g]) for g in top)}"] = np.sort(
            members
        )
    return out


def set_components(
    x: np.ndarray, set_idx: np.ndarray, gene_idx: np.ndarray, n_sets: int, n_channels: int
) -> np.ndarray:
    """Starting member weights ``(M, n_channels)`` of pathway tokens from the data.

    Channel 0 is the set's mean (``1 / sqrt(size)`` per member); channels ``1..`` are the
    leading principal axes of the set's members over the cells of ``x`` (centred,
    unit-norm, signed so that the largest loading is positive), so a token starts with its
    set's main within-set contrasts rather than random ones. Channels beyond a set's rank
    are 0.

    Parameters
    ----------
    x
        Cells × genes, log-normalised expression (a sample of the training cells; dense or
        scipy sparse).
    set_idx, gene_idx
        Memberships, as :func:`memberships` returns them.
    n_sets, n_channels
        Sets and channels of the encoder.
    """
    from scipy import sparse

    x = x.toarray() if sparse.issparse(x) else x
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((set_idx.size, n_channels), dtype=np.float64)
    for p in range(n_sets):
        rows = np.flatnonzero(set_idx == p)
        if not rows.size:
            continue
        out[rows, 0] = rows.size**-0.5
        k = min(n_channels - 1, rows.size - 1, x.shape[0] - 1)
        if k <= 0:
            continue
        sub = x[:, gene_idx[rows]]
        sub = sub - sub.mean(0)
        # thin SVD: cells × genes costs min(cells, genes)² × max, even for a catch-all token
        # of thousands of genes
        _, sv, vt = np.linalg.svd(sub, full_matrices=False)
        vec = vt[:k].T  # genes × k, unit columns, by falling variance
        vec = vec * np.where(vec[np.abs(vec).argmax(0), np.arange(k)] < 0, -1.0, 1.0)
        vec[:, sv[:k] <= 1e-6 * max(sv[0], 1e-300)] = 0.0  # no variance: no direction
        out[rows, 1 : k + 1] = vec
    return out


def go_gene_graph(
    var_names: Sequence[str],
    ontology: str = "BP",
    max_term_size: int = 50,
    path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Edges ``(E, 2)`` (``i < j``) between genes of ``var_names`` that share a specific GO
    term: one annotated to at most ``max_term_size`` genes genome-wide (broad terms would
    link nearly everything)."""
    from ..datasets import go_gene2go

    g2g = go_gene2go(path)
    g2g = g2g[g2g["ontology"] == ontology][["go_id", "symbol"]].dropna().drop_duplicates()
    size = g2g.groupby("go_id")["symbol"].transform("size")
    g2g = g2g[size <= max_term_size]
    index = {g: i for i, g in enumerate(map(str, var_names))}
    g2g = g2g[g2g["symbol"].isin(index)]
    pairs = []
    for _, genes in g2g.groupby("go_id")["symbol"]:
        idx = np.array(sorted(index[g] for g in genes), dtype=np.int64)
        if idx.size > 1:
            i, j = np.triu_indices(idx.size, k=1)
            pairs.append(np.stack([idx[i], idx[j]], 1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def as_gene_graph(graph, var_names: Sequence[str]) -> np.ndarray:
    """A user's gene graph as edges ``(E, 2)`` (``i < j``) over ``var_names``' indices.

    Accepts a square matrix (numpy or scipy sparse, genes × genes in ``var_names``' order;
    nonzero = edge), a :class:`pandas.DataFrame` whose first two columns name genes, or a
    sequence of gene-name pairs. Edges between genes not in ``var_names`` are dropped;
    self-loops are dropped (every token attends to itself anyway).

    Raises
    ------
    SCFMInputError
        A matrix of the wrong shape, or no edge left between the data's genes.
    """
    import pandas as pd
    from scipy import sparse

    n = len(var_names)
    if sparse.issparse(graph) or isinstance(graph, np.ndarray):
        if graph.shape != (n, n):
            raise SCFMInputError(
                f"gene_graph is a {graph.shape[0]} x {graph.shape[1]} matrix; expected "
                f"{n} x {n} (genes in the model's order), or pass an edge list of gene names."
            )
        coo = sparse.coo_matrix(graph)
        keep = coo.data != 0
        edges = np.stack([coo.row[keep], coo.col[keep]], 1).astype(np.int64)
    else:
        pairs = graph.iloc[:, :2].to_numpy() if isinstance(graph, pd.DataFrame) else graph
        index = {g: i for i, g in enumerate(map(str, var_names))}
        edges = np.array(
            [
                (index[str(a)], index[str(b)])
                for a, b in pairs
                if str(a) in index and str(b) in index
            ],
            dtype=np.int64,
        ).reshape(-1, 2)
    edges = np.sort(edges, axis=1)
    edges = edges[edges[:, 0] != edges[:, 1]]
    if edges.size == 0:
        raise SCFMInputError(
            "gene_graph has no edge between two of the data's genes (are the names the same "
            "identifiers as adata.var_names?)."
        )
    return np.unique(edges, axis=0)


def set_coverage(
    set_idx: np.ndarray, gene_idx: np.ndarray, names: Sequence[str], gene_variance: np.ndarray
) -> dict:
    """How much of a data set the named gene sets hold (JSON-ready).

    Parameters
    ----------
    set_idx, gene_idx, names
        Memberships and set names from :func:`memberships` (sets named
        :data:`OTHER_GENES`, or starting with it, are the catch-all).
    gene_variance
        Each gene's variance over the cells (of normalised, log-transformed expression).

    Returns
    -------
    A dict: ``n_sets`` and ``n_catch_all`` (named sets, catch-all tokens),
    ``genes_in_sets`` and ``variance_in_sets`` (the genes in at least one named set and their
    share of the summed gene variance), ``catch_all_genes`` and ``catch_all_variance`` (the
    same for the catch-all).
    """
    var = np.asarray(gene_variance, dtype=np.float64)
    total = float(var.sum()) or 1.0
    catch = np.array([is_catch_all(n) for n in names], dtype=bool)
    in_catch = catch[set_idx]
    named = np.unique(gene_idx[~in_catch])
    rest = np.unique(gene_idx[in_catch])
    return {
        "n_sets": int((~catch).sum()),
        "n_catch_all": int(catch.sum()),
        "genes_in_sets": int(named.size),
        "variance_in_sets": float(var[named].sum() / total),
        "catch_all_genes": int(rest.size),
        "catch_all_variance": float(var[rest].sum() / total),
    }


def set_graph(
    set_idx: np.ndarray,
    gene_idx: np.ndarray,
    n_sets: int,
    gene_edges: np.ndarray | None = None,
    min_jaccard: float = 0.05,
    min_edge_share: float = 0.0,
) -> np.ndarray:
    """Edges ``(E, 2)`` between gene sets: sets sharing at least ``min_jaccard`` of their
    genes, and, with ``gene_edges``, sets linked by gene-graph edges.

    Two sets ``A`` and ``B`` are linked through the gene graph when the edges between their
    members are at least ``min_edge_share`` of the ``|A| × |B|`` member pairs (and at least
    one). With 0, a single edge links two sets, and a graph such as GO's then links most
    pairs (:func:`graph_density` measures it).
    """
    from scipy import sparse

    n_genes = int(gene_idx.max()) + 1 if gene_idx.size else 0
    if gene_edges is not None and gene_edges.size:
        n_genes = max(n_genes, int(gene_edges.max()) + 1)
    m = sparse.csr_matrix(
        (np.ones(set_idx.size, np.float32), (set_idx, gene_idx)), shape=(n_sets, n_genes)
    )
    inter = (m @ m.T).toarray()
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    adj = inter >= min_jaccard * np.maximum(union, 1)
    if gene_edges is not None and gene_edges.size:
        g = sparse.coo_matrix(
            (np.ones(len(gene_edges), np.float32), (gene_edges[:, 0], gene_edges[:, 1])),
            shape=(n_genes, n_genes),
        )
        g = g + g.T
        cross = (m @ g @ m.T).toarray()
        pairs = np.maximum(size[:, None] * size[None, :], 1)
        adj |= (cross > 0) & (cross >= min_edge_share * pairs)
    i, j = np.nonzero(np.triu(adj, k=1))
    return np.stack([i, j], 1).astype(np.int64)


def graph_density(edges: np.ndarray, n_nodes: int) -> float:
    """Share of the ``n (n - 1) / 2`` node pairs that undirected ``edges`` link (1 with
    fewer than two nodes)."""
    pairs = n_nodes * (n_nodes - 1) / 2
    if pairs <= 0:
        return 1.0
    e = np.unique(np.sort(np.asarray(edges, dtype=np.int64).reshape(-1, 2), axis=1), axis=0)
    return float((e[:, 0] != e[:, 1]).sum() / pairs)


def resolve_gene_sets(
    gene_sets, var_names: Sequence[str], propagate: bool = False, **select
) -> dict[str, np.ndarray]:
    """``"go"`` / ``"go_bp"`` / ``"go_mf"`` / ``"go_cc"`` (``propagate``: with the genes of
    the terms below, :func:`go_gene_sets`), a GMT path or a dict, fitted to ``var_names``
    by :func:`select_gene_sets` (``select``: its options)."""
    if isinstance(gene_sets, str) and gene_sets.lower() in ("go", "go_bp", "go_mf", "go_cc"):
        ont = {"go": "BP"}.get(gene_sets.lower(), gene_sets[-2:].upper())
        sets = go_gene_sets(ont, propagate=propagate)
    elif isinstance(gene_sets, str | os.PathLike) and Path(gene_sets).suffix.lower() == ".gmt":
        sets = read_gmt(gene_sets)
    elif isinstance(gene_sets, Mapping):
        sets = {str(k): list(v) for k, v in gene_sets.items()}
    else:
        raise SCFMInputError(
            f"gene_sets={gene_sets!r}: pass 'go' (GO biological processes), 'go_mf', 'go_cc', "
            "a path to a .gmt file, or a dict of set name to gene names."
        )
    return select_gene_sets(sets, var_names, **select)

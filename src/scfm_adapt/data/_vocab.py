"""A data set's genes in an external backbone's vocabulary, and the weights file it ships.

Geneformer keys its vocabulary by Ensembl ids, scGPT by gene symbols; both reserve keys in
angle brackets (``<pad>``, ``<cls>`` ...) for special tokens. :func:`map_genes_to_vocab`
gives each gene its token id and refuses a data set whose genes the backbone mostly does
not know; :func:`vocab_report` says how much of the data the known genes carry.

Nothing here imports torch at import time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, GeneMismatchError

_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")


def is_special(key: str) -> bool:
    """Whether a vocabulary key is a special token (``<pad>``, ``<cls>`` ...), not a gene."""
    return str(key).startswith("<")


def map_genes_to_vocab(
    var_names: Sequence[str],
    vocab: Mapping[str, int],
    *,
    id_map: Mapping[str, str] | None = None,
    min_fraction: float = 0.5,
    gene_totals=None,
) -> tuple[np.ndarray, float]:
    """Token id of each gene in a backbone's vocabulary.

    A name is looked up as is, then without an Ensembl version suffix (``ENSG….12``), then
    through ``id_map``. Special tokens (keys starting with ``<``) never count as genes. When
    two names map to the same token the first keeps it and the later ones get ``-1``, so
    every token appears at most once in a cell's sequence.

    Parameters
    ----------
    var_names
        Gene names of the data (``adata.var_names`` or an id column of ``adata.var``).
    vocab
        Vocabulary key → token id (a Geneformer token dictionary, scGPT's ``vocab.json``).
    id_map
        Optional name → vocabulary key (e.g. gene symbol → Ensembl id), used when a name
        is not a key itself.
    min_fraction
        Smallest fraction of genes that must be in the vocabulary.
    gene_totals
        Optional total counts of each gene: the error then also says what share of the
        data's counts the known genes carry.

    Returns
    -------
    token_ids
        ``int64`` array of length ``len(var_names)``; ``-1`` for genes outside the vocabulary.
    fraction_in_vocab
        Fraction of the genes with a token id.

    Raises
    ------
    GeneMismatchError
        Fewer than ``min_fraction`` of the genes are in the vocabulary.
    """
    names = [str(n) for n in var_names]
    id_map = id_map or {}
    token_ids = np.full(len(names), -1, dtype=np.int64)
    seen: set[int] = set()
    for i, name in enumerate(names):
        key = _vocab_key(name, vocab, id_map)
        if key is None:
            continue
        tok = int(vocab[key])
        if tok in seen:  # a duplicate would put one gene twice into a cell's sequence
            continue
        seen.add(tok)
        token_ids[i] = tok
    n_in = int((token_ids >= 0).sum())
    fraction = n_in / len(names) if names else 0.0
    if fraction < min_fraction or not names:
        n_vocab = sum(not is_special(k) for k in vocab)
        report = vocab_report(names, token_ids, gene_totals, n_examples=3)
        share = report["count_share"]
        counts = "" if share is None else f", carrying {100 * share:.1f}% of the counts,"
        raise GeneMismatchError(
            f"{100 * fraction:.1f}% of the {len(names):,} genes ({n_in:,}){counts} are in the "
            f"backbone's vocabulary of {n_vocab:,} genes; need at least "
            f"{100 * min_fraction:.0f}%. Missing, e.g.: {report['missing_examples']}. "
            f"{_key_hint(vocab)}"
        )
    return token_ids, fraction


def _key_hint(vocab: Mapping[str, int]) -> str:
    """How to name genes so that ``vocab`` knows them."""
    example = next((k for k in vocab if not is_special(k)), "")
    if str(example).startswith("ENS"):
        return (
            f"The vocabulary is keyed by Ensembl gene ids (e.g. {example!r}): pass Ensembl "
            "ids, with gene_id_key= naming the adata.var column that holds them, or an id "
            "map from your gene names to Ensembl ids (sfa.datasets.go_gene_ids() maps gene "
            "symbols ↔ Ensembl ids)."
        )
    return (
        f"The vocabulary is keyed by gene symbols (e.g. {example!r}): pass human gene "
        "symbols, with gene_id_key= naming the adata.var column that holds them "
        "(sfa.datasets.go_gene_ids() maps Ensembl ids ↔ gene symbols); genes of another "
        "species need mapping to their human orthologues first."
    )


def _vocab_key(name: str, vocab: Mapping[str, int], id_map: Mapping[str, str]) -> str | None:
    if is_special(name):
        return None
    if name in vocab:
        return name
    m = _ENSEMBL_VERSION.match(name)
    if m and m.group(1) in vocab:  # GENCODE-style versioned id; vocabularies are unversioned
        return m.group(1)
    key = id_map.get(name)
    if key is not None and not is_special(key) and key in vocab:
        return key
    return None


def vocab_report(
    var_names: Sequence[str], token_ids: Sequence[int], gene_totals=None, n_examples: int = 10
) -> dict:
    """How well a data set's genes fit a backbone's vocabulary (JSON-ready).

    Parameters
    ----------
    var_names
        The data's genes.
    token_ids
        Their token ids from :func:`map_genes_to_vocab` (``-1``: not in the vocabulary).
    gene_totals
        Optional total counts of each gene over the data; gives ``count_share``.
    n_examples
        How many missing genes to list, the most expressed first when ``gene_totals`` is
        given.

    Returns
    -------
    ``{"n_genes", "n_in_vocab", "fraction", "count_share", "missing_examples"}``:
    ``count_share`` is the share of the data's counts on genes in the vocabulary (what the
    backbone actually reads; ``None`` without ``gene_totals``).
    """
    names = np.asarray([str(n) for n in var_names], dtype=object)
    known = np.asarray(token_ids) >= 0
    share = None
    order = np.arange(len(names))
    if gene_totals is not None:
        totals = np.asarray(gene_totals, dtype=np.float64).ravel()
        total = float(totals.sum())
        share = float(totals[known].sum() / total) if total > 0 else None
        order = np.argsort(-totals, kind="stable")
    missing = [str(names[i]) for i in order if not known[i]][:n_examples]
    return {
        "n_genes": len(names),
        "n_in_vocab": int(known.sum()),
        "fraction": float(known.mean()) if len(names) else 0.0,
        "count_share": share,
        "missing_examples": missing,
    }


def read_weights(path: Path) -> dict:
    """A checkpoint's tensors from ``.safetensors``, or from a torch file read with
    ``weights_only=True`` (a ``.pt``/``.bin`` is a pickle; it may never run code)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"Cannot read the weights in {path} ({err}). It must hold a state dict of "
            "tensors (torch.save(model.state_dict(), ...)), not a pickled model object."
        ) from err


__all__ = ["is_special", "map_genes_to_vocab", "read_weights", "vocab_report"]

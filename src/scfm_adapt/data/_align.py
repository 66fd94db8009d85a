"""Align a query AnnData's genes to a reference model's genes (by name)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import TooFewGenesError
from ._gene_panels import BATCH_GENE_MASKS, OBSERVED_KEY


@dataclass(frozen=True)
class GeneOverlap:
    """How a query's genes relate to a reference's."""

    n_reference: int
    n_query: int
    n_shared: int
    missing: list[str]  # reference genes absent from the query (masked)
    extra: list[str]  # query genes the reference lacks (dropped)

    @property
    def fraction(self) -> float:
        """Share of the reference's genes that the query has."""
        return self.n_shared / self.n_reference

    def __str__(self) -> str:
        return (
            f"{self.n_shared:,} of {self.n_reference:,} reference genes found in the query "
            f"({self.fraction:.1%}); {len(self.missing):,} missing (masked), "
            f"{len(self.extra):,} query genes not in the reference (dropped)"
        )


def gene_overlap(var_names: Sequence[str], reference: Sequence[str]) -> GeneOverlap:
    """Compare gene names (exact, case-sensitive match)."""
    q = [str(g) for g in var_names]
    ref = [str(g) for g in reference]
    qs, rs = set(q), set(ref)
    return GeneOverlap(
        n_reference=len(ref),
        n_query=len(q),
        n_shared=len(qs & rs),
        missing=[g for g in ref if g not in qs],
        extra=[g for g in q if g not in rs],
    )


def align_genes(
    adata,
    reference: Sequence[str],
    *,
    layer: str | None = None,
    min_overlap: float = 0.5,
):
    """Return a copy of ``adata`` whose genes are exactly ``reference``, in its order.

    Shared genes are reordered, query genes the reference lacks are dropped, and reference
    genes the query lacks are added as empty columns marked ``False`` in
    ``var["scfm_observed"]``. Models treat such genes as *unobserved*, not as zero counts:
    they are masked out of the encoder input, the library normalisation and the
    likelihood (see :meth:`~scfm_adapt.module.SCFMModule.set_gene_mask`).

    Parameters
    ----------
    adata
        Query cells × genes with counts in ``X`` or ``layers[layer]``.
    reference
        The reference model's genes (``model.var_names_``).
    layer
        Layer to carry over (others are dropped); ``None`` uses ``X``.
    min_overlap
        Smallest usable share of the reference genes found in the query.

    Returns
    -------
    The aligned AnnData (``obs`` and ``obsm`` kept); the :class:`GeneOverlap` is in
    ``uns["scfm_gene_overlap"]`` as a dict, and the gene panels of data combined from files
    with different genes (``uns["scfm_batch_gene_masks"]``) are carried over.

    Raises
    ------
    TooFewGenesError
        When fewer than ``min_overlap`` of the reference genes are in the query.
    """
    import scipy.sparse as sp
    from anndata import AnnData

    from ._validation import get_matrix

    overlap = gene_overlap(adata.var_names, reference)
    if overlap.fraction < min_overlap:
        raise TooFewGenesError(
            f"Only {overlap}. At least {min_overlap:.0%} of the reference genes are needed. "
            "Check that both use the same identifiers (symbols vs Ensembl ids, case, "
            "species), or pass a lower min_overlap if you accept a weaker mapping."
        )
    ref = [str(g) for g in reference]
    pos = {g: i for i, g in enumerate(ref)}
    src_cols = np.array([i for i, g in enumerate(adata.var_names) if str(g) in pos], dtype=int)
    dst_cols = np.array([pos[str(adata.var_names[i])] for i in src_cols], dtype=int)
    x = sp.csr_matrix(get_matrix(adata, layer))[:, src_cols].tocoo()
    aligned = sp.csr_matrix(
        (x.data, (x.row, dst_cols[x.col])), shape=(adata.n_obs, len(ref)), dtype=x.dtype
    )
    out = AnnData(X=aligned, obs=adata.obs.copy(), obsm=dict(adata.obsm))
    out.var_names = ref
    observed = np.zeros(len(ref), dtype=bool)
    observed[dst_cols] = True
    out.var[OBSERVED_KEY] = observed
    out.uns["scfm_gene_overlap"] = {
        "n_reference": overlap.n_reference,
        "n_query": overlap.n_query,
        "n_shared": overlap.n_shared,
        "fraction": overlap.fraction,
        "n_missing": len(overlap.missing),
        "n_extra": len(overlap.extra),
    }
    panels = adata.uns.get(BATCH_GENE_MASKS)
    if panels:  # each batch's gene panel, carried onto the reference genes
        moved = {}
        for batch, obs in panels.get("observed", {}).items():
            row = np.zeros(len(ref), dtype=bool)
            row[dst_cols] = np.asarray(obs, dtype=bool).ravel()[src_cols]
            moved[batch] = row
        out.uns[BATCH_GENE_MASKS] = {"batch_key": panels.get("batch_key"), "observed": moved}
    if layer is not None:
        out.layers[layer] = out.X.copy()
    return out

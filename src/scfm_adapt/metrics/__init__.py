"""Metrics that compare generated cells with real ones (usable on any two AnnData objects),
and embeddings of the same cells with each other.

>>> import scfm_adapt as sfa
>>> sfa.metrics.classifier_two_sample_test(real, generated)  # 0.5: indistinguishable
>>> sfa.metrics.evaluate_generation(real, generated, groupby="cell_type")
"""

from ._generation import (
    classifier_two_sample_test,
    embed_pair,
    energy_distance,
    evaluate_generation,
    gene_statistics,
    lognormalize,
    mmd,
)
from ._neighbors import neighbor_agreement

__all__ = [
    "classifier_two_sample_test",
    "embed_pair",
    "energy_distance",
    "evaluate_generation",
    "gene_statistics",
    "lognormalize",
    "mmd",
    "neighbor_agreement",
]

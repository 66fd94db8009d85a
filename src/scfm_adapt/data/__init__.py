"""Input checks and gene alignment between AnnData objects and models."""

from ._validation import check_counts, check_genes, check_layer_counts, get_matrix

__all__ = ["check_counts", "check_genes", "check_layer_counts", "get_matrix"]

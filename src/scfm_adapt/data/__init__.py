"""Input checks and gene alignment between AnnData objects and models."""

from ._align import OBSERVED_KEY, GeneOverlap, align_genes, gene_overlap
from ._backed import is_backed, matrix_sums, read_backed, row_blocks
from ._checksums import counts_sha256, file_sha256
from ._combine import combine_h5ad
from ._gene_panels import (
    BATCH_GENE_MASKS,
    batch_mask_matrix,
    merge_batch_gene_masks,
    read_batch_gene_masks,
    select_panel,
)
from ._geneformer import (
    GeneformerCheckpoint,
    load_geneformer,
    safe_load_pickle,
    write_random_geneformer,
)
from ._genesets import (
    OTHER_GENES,
    as_gene_graph,
    go_gene_graph,
    go_gene_sets,
    graph_density,
    is_catch_all,
    memberships,
    read_gmt,
    residual_programmes,
    resolve_gene_sets,
    select_gene_sets,
    set_components,
    set_coverage,
    set_graph,
    uncovered_genes,
)
from ._mudata import pair_modalities
from ._perturbations import (
    canonical_perturbation,
    context_labels,
    parse_doses,
    parts_and_doses,
    split_perturbation,
)
from ._scgpt import ScGPTCheckpoint, load_scgpt, scgpt_config, write_random_scgpt
from ._validation import (
    check_counts,
    check_genes,
    check_layer_counts,
    check_not_view,
    check_obs_keys,
    check_unique_names,
    gene_order,
    get_matrix,
)
from ._vocab import map_genes_to_vocab, vocab_report

__all__ = [
    "BATCH_GENE_MASKS",
    "OBSERVED_KEY",
    "OTHER_GENES",
    "GeneOverlap",
    "GeneformerCheckpoint",
    "ScGPTCheckpoint",
    "align_genes",
    "as_gene_graph",
    "batch_mask_matrix",
    "canonical_perturbation",
    "check_counts",
    "check_genes",
    "check_layer_counts",
    "check_not_view",
    "check_obs_keys",
    "check_unique_names",
    "combine_h5ad",
    "context_labels",
    "counts_sha256",
    "file_sha256",
    "gene_order",
    "gene_overlap",
    "get_matrix",
    "go_gene_graph",
    "go_gene_sets",
    "graph_density",
    "is_backed",
    "is_catch_all",
    "load_geneformer",
    "load_scgpt",
    "map_genes_to_vocab",
    "matrix_sums",
    "memberships",
    "merge_batch_gene_masks",
    "pair_modalities",
    "parse_doses",
    "parts_and_doses",
    "read_backed",
    "read_batch_gene_masks",
    "read_gmt",
    "residual_programmes",
    "resolve_gene_sets",
    "row_blocks",
    "safe_load_pickle",
    "scgpt_config",
    "select_gene_sets",
    "select_panel",
    "set_components",
    "set_coverage",
    "set_graph",
    "split_perturbation",
    "uncovered_genes",
    "vocab_report",
    "write_random_geneformer",
    "write_random_scgpt",
]

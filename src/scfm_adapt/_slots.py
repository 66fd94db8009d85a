"""Where results go: every AnnData slot name the package writes (scanpy conventions),
defined once. Models use them for the new objects they return (``model/_results.py``);
``sfa.tl`` writes results into the user's AnnData under them; ``sfa.pl`` reads them.

No imports beyond the standard library: ``tl`` and ``pl`` import this without the models.
"""

from __future__ import annotations

from typing import NamedTuple


class _Slots(NamedTuple):
    embedding: str = "X_scfm"  # obsm: cell embedding (tl.embed)
    normalized: str = "scfm_normalized"  # layers: denoised expression (tl.normalize_expression)
    label: str = "scfm_label"  # obs / obsm prefix: annotation (tl.annotate)
    expected: str = "scfm_expected"  # layers: the decoder's mean of returned cells
    lognorm: str = "scfm_lognorm"  # layers: predicted log1p(CP10k) expression of returned cells
    library: str = "scfm_library"  # obs: library size of generated cells
    generate: str = "scfm_generate"  # uns: parameters of generate()
    counterfactual: str = "scfm_counterfactual"  # uns: parameters of counterfactual()
    source: str = "scfm_source"  # obs prefix: a counterfactual cell's original covariate
    perturbation: str = "scfm_perturbation"  # uns: predict_perturbation's parameters
    delta: str = "scfm_delta"  # varm: predicted mean change per gene and request
    delta_lower: str = "scfm_delta_lower"  # varm: its interval's bounds
    delta_upper: str = "scfm_delta_upper"
    control_cell: str = "scfm_control_cell"  # obs: the control cell a prediction starts from
    uncertainty: str = "scfm_uncertainty"  # obs: members' disagreement per predicted cell
    ood_score: str = "ood_score"  # obs: out-of-distribution score of the request
    generated: str = "scfm_generated"  # obs: marks generated cells (tl.augment)
    augment: str = "scfm_augment"  # uns: parameters of tl.augment
    inference: str = "scfm_inference"  # uns: parameters of tl.infer_to_disk
    pathways: str = "scfm_pathways"  # obsm / uns: pathway attributions (tl.pathway_attributions)


#: The slot names; ``SLOTS.delta == "scfm_delta"``.
SLOTS = _Slots()

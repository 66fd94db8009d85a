"""Scanpy-style tools: ``f(adata, model, *, key_added=...)`` write results into slots."""

from ._annotate import annotate, transfer_labels
from ._augment import augment
from ._embed import embed
from ._infer_to_disk import infer_to_disk
from ._normalize_expression import normalize_expression
from ._pathway_attributions import pathway_attributions, top_pathways
from ._predict_perturbation import predict_perturbation

__all__ = [
    "annotate",
    "augment",
    "embed",
    "infer_to_disk",
    "normalize_expression",
    "pathway_attributions",
    "predict_perturbation",
    "top_pathways",
    "transfer_labels",
]

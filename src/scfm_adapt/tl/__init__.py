"""Scanpy-style tools: ``f(adata, model, *, key_added=...)`` write results into slots."""

from ._annotate import annotate
from ._augment import augment
from ._disk import infer_to_disk
from ._embed import embed
from ._normalize import normalize_expression
from ._perturb import predict_perturbation

__all__ = [
    "annotate",
    "augment",
    "embed",
    "infer_to_disk",
    "normalize_expression",
    "predict_perturbation",
]

"""Model classes: AnnData (or MuData) and scvi-tools' registry in, results out."""

from ._annotator import CellAnnotator
from ._distill import distill
from ._perturbation import PerturbationModel, UnknownPerturbationError
from ._pretrain import pretrain
from ._scfm import SCFM

__all__ = [
    "SCFM",
    "CellAnnotator",
    "PerturbationModel",
    "UnknownPerturbationError",
    "distill",
    "pretrain",
]

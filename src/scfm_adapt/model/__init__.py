"""Model classes: the only code, with ``tl``, that sees AnnData and the registry."""

from ._annotator import CellAnnotator
from ._distill import distill
from ._perturbation import PerturbationModel, UnknownPerturbationError
from ._scfm import SCFM

__all__ = ["SCFM", "CellAnnotator", "PerturbationModel", "UnknownPerturbationError", "distill"]

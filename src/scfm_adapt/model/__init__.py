"""Model classes: the only code, with ``tl``, that sees AnnData and the registry."""

from ._scfm import SCFM

__all__ = ["SCFM"]

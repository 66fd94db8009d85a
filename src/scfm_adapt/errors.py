"""Error classes raised on bad input. Each message names the problem and the fix.

All derive from :class:`ValueError`, so ``except ValueError`` keeps working.
"""


class SCFMInputError(ValueError):
    """Base class of the input errors raised by scfm_adapt."""


class InvalidCountsError(SCFMInputError):
    """The data are not raw counts (non-integer, negative, NaN or infinite values)."""


class GeneMismatchError(SCFMInputError):
    """The genes of an AnnData do not match those a model was trained on."""


class UnknownCategoryError(SCFMInputError):
    """A categorical covariate holds a category the model has never seen."""


class AdapterMismatchError(SCFMInputError):
    """A saved adapter was made for another model (other genes or sizes)."""


class TooFewGenesError(GeneMismatchError):
    """A query data set shares too few genes with a reference model to map onto it."""


class ModalityError(SCFMInputError):
    """A MuData lacks a modality the model needs, or its modalities' cells do not match."""


class CheckpointError(SCFMInputError):
    """A checkpoint folder is missing, truncated, tampered with or of an unknown format."""


__all__ = [
    "AdapterMismatchError",
    "CheckpointError",
    "GeneMismatchError",
    "InvalidCountsError",
    "ModalityError",
    "SCFMInputError",
    "TooFewGenesError",
    "UnknownCategoryError",
]

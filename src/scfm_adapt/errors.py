"""Error classes. Each message names the problem and the fix.

The input errors derive from :class:`SCFMInputError`, a :class:`ValueError` (so ``except
ValueError`` keeps working); :class:`MissingKeyError` is also a :class:`KeyError`.
:class:`TrainingDivergedError` is raised when training produces a NaN or infinite loss.
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


class MissingKeyError(SCFMInputError, KeyError):
    """A layer or ``obs`` column the model needs is not in the AnnData."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class DuplicateNamesError(SCFMInputError):
    """``obs_names`` or ``var_names`` hold duplicates."""


class CheckpointError(SCFMInputError):
    """A checkpoint folder is missing, truncated, tampered with or of an unknown format."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


__all__ = [
    "AdapterMismatchError",
    "CheckpointError",
    "DuplicateNamesError",
    "GeneMismatchError",
    "InvalidCountsError",
    "MissingKeyError",
    "ModalityError",
    "SCFMInputError",
    "TooFewGenesError",
    "TrainingDivergedError",
    "UnknownCategoryError",
]

"""Training plans (Lightning modules) and callbacks for the SCFM stages."""

from ._calibration import fit_temperature
from ._callbacks import (
    DEFAULT_GRADIENT_CLIP,
    PRIOR_GRADIENT_CLIP,
    DivergenceGuard,
    EpochCheckpoint,
    RNGState,
    guarded,
)
from ._plan import SCFMTrainingPlan

__all__ = [
    "DEFAULT_GRADIENT_CLIP",
    "PRIOR_GRADIENT_CLIP",
    "DivergenceGuard",
    "EpochCheckpoint",
    "RNGState",
    "SCFMTrainingPlan",
    "fit_temperature",
    "guarded",
]

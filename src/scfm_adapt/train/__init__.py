"""Training plans (Lightning modules) for the SCFM stages."""

from ._plan import SCFMTrainingPlan

__all__ = ["SCFMTrainingPlan"]

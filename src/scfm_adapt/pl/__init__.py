"""Plots (matplotlib; scanpy for UMAPs). Each returns its figure, never changes its inputs,
and takes scanpy's ``save=`` (a path) and ``show=`` (``None``: show when interactive)."""

from ._plots import (
    adaptation,
    calibration,
    embedding,
    generated_vs_real,
    history,
    pathway_attributions,
    perturbation_delta,
    perturbation_heatmap,
)

__all__ = [
    "adaptation",
    "calibration",
    "embedding",
    "generated_vs_real",
    "history",
    "pathway_attributions",
    "perturbation_delta",
    "perturbation_heatmap",
]

"""Plots (matplotlib; scanpy for UMAPs). Each returns its figure, never changes its inputs,
and takes scanpy's ``save=`` (a path) and ``show=`` (``None``: show when interactive)."""

from ._plots import calibration, embedding, history, perturbation_delta

__all__ = ["calibration", "embedding", "history", "perturbation_delta"]

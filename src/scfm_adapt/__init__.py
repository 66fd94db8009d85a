"""scfm_adapt: single-cell foundation models adapted cheaply, on AnnData and MuData.

Sub-packages are imported lazily so that ``import scfm_adapt`` stays light (no torch,
no scvi-tools until a model is touched).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

_SUBMODULES = (
    "model",
    "tl",
    "pl",
    "metrics",
    "baselines",
    "benchmark",
    "datasets",
    "data",
    "module",
    "nn",
    "diffusion",
    "train",
)
__all__ = [*_SUBMODULES, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from . import (  # noqa: F401
        baselines,
        benchmark,
        data,
        datasets,
        diffusion,
        metrics,
        model,
        module,
        nn,
        pl,
        tl,
        train,
    )


def __getattr__(name: str):
    if name in _SUBMODULES:
        mod = importlib.import_module(f".{name}", __name__)
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'scfm_adapt' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)

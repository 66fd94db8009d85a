"""Perturbation names, defined once for the models and the baselines.

A perturbation is named by its parts joined by a delimiter (``"KLF1+MAP2K6"``); the order of
the parts does not matter and the control label may appear as a part (``"KLF1+ctrl"`` is
``"KLF1"``). A cell's *context* is the values of the context columns (cell type, cell line,
donor) joined by ``" | "``. Doses come one per part (``"1+0.5"``) or one for all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import SCFMInputError


def split_perturbation(name: str, control_group: str, delimiter: str = "+") -> list[str]:
    """Sorted parts of a perturbation name without control parts (``[]`` for a control)."""
    name = str(name)
    if name == control_group:
        return []
    parts = [p.strip() for p in name.split(delimiter)] if delimiter else [name.strip()]
    return sorted(p for p in parts if p and p != control_group)


def canonical_perturbation(name: str, control_group: str, delimiter: str = "+") -> str:
    """Order-invariant name: parts split on ``delimiter``, stripped, control parts and empty
    parts dropped, duplicates kept, sorted, joined. ``"B+A"`` → ``"A+B"``; ``"A+ctrl"`` →
    ``"A"``; ``"ctrl"`` → ``control_group``."""
    parts = split_perturbation(name, control_group, delimiter)
    return delimiter.join(parts) if parts else control_group


def context_labels(obs: pd.DataFrame, context_keys: Sequence[str]) -> np.ndarray:
    """One string per cell naming its context: the values of ``context_keys`` joined by
    ``" | "`` (``""`` without context keys)."""
    if not context_keys:
        return np.full(len(obs), "", dtype=object)
    missing = [k for k in context_keys if k not in obs]
    if missing:
        raise KeyError(f"Context columns {missing} are not in obs.")
    cols = [obs[k].astype(str).to_numpy() for k in context_keys]
    return np.array([" | ".join(v) for v in zip(*cols)], dtype=object)


def parse_doses(value, n_parts: int, delimiter: str) -> list[float]:
    """The dose of each of ``n_parts`` parts: 1 each when ``value`` is missing, one number
    for all, or one per part (a list, or numbers joined by ``delimiter``)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return [1.0] * n_parts
    if isinstance(value, list | tuple | np.ndarray):
        vals = list(value)
    elif isinstance(value, str) and delimiter and delimiter in value:
        vals = value.split(delimiter)
    else:
        vals = [value] * n_parts
    try:
        out = [float(v) for v in vals]
    except (TypeError, ValueError) as e:
        raise SCFMInputError(
            f"Dose {value!r} is not a number (or numbers joined by {delimiter!r})."
        ) from e
    if len(out) != n_parts:
        raise SCFMInputError(
            f"Dose {value!r} has {len(out)} values for {n_parts} perturbation parts."
        )
    if any(not np.isfinite(v) or v < 0 for v in out):
        raise SCFMInputError(f"Dose {value!r} must be finite and non-negative.")
    return out


def parts_and_doses(
    name: str, dose, control_group: str, delimiter: str = "+"
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Canonical (sorted) parts of a perturbation with their doses; ``((), ())`` for the
    control. ``dose`` is read as :func:`parse_doses` reads it, in the order the name gives
    the parts (control parts included)."""
    raw = [p.strip() for p in str(name).split(delimiter)] if delimiter else [str(name).strip()]
    keep = [i for i, p in enumerate(raw) if p and p != control_group]
    if str(name) == control_group or not keep:
        return (), ()
    doses = parse_doses(dose, len(raw), delimiter)
    pairs = sorted((raw[i], doses[i]) for i in keep)
    return tuple(p for p, _ in pairs), tuple(d for _, d in pairs)

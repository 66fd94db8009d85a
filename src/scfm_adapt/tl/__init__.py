"""Scanpy-style tools: ``f(adata, model, *, key_added=...)`` write results into slots."""

from ._embed import embed
from ._normalize import normalize_expression

__all__ = ["embed", "normalize_expression"]

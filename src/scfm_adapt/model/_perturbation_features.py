"""Features of perturbation parts, so that unseen genes get predictions: GO annotations,
the backbone decoder's weights of measured genes, or any table of part -> vector."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: ``gene_features`` names and the tables they join (``"go?"``: GO when found).
KINDS = {
    "auto": ["go?"],
    "go": ["go"],
    "backbone": ["backbone"],
    "go+backbone": ["go", "backbone"],
}


def gene_feature_table(arg, backbone) -> pd.DataFrame | None:
    """The features table that ``gene_features=arg`` names (see
    :class:`~scfm_adapt.model.PerturbationModel`): parts (genes) by features, float32;
    ``None`` when there are none. ``backbone`` is the model's :class:`SCFM`."""
    tables = []
    if isinstance(arg, pd.DataFrame):
        tables.append(arg.astype(np.float32))
    elif arg is not None:
        if arg not in KINDS:
            raise ValueError(
                f"gene_features={arg!r}; choose 'auto', 'go', 'backbone', 'go+backbone', "
                "None or a DataFrame."
            )
        for kind in KINDS[arg]:
            if kind.startswith("go"):
                from ..datasets import go_gene_features

                try:
                    tables.append(go_gene_features())
                except FileNotFoundError:
                    if kind == "go":
                        raise
                    logger.info(
                        "GO tables not found: perturbation parts get learned embeddings only."
                    )
            else:
                w = backbone.module.decoder.scale_head.weight.detach().cpu().numpy()
                w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
                tables.append(
                    pd.DataFrame(
                        w,
                        index=backbone.var_names_,
                        columns=[f"bb_{i}" for i in range(w.shape[1])],
                    )
                )
    if not tables:
        return None
    if len(tables) == 1:
        out = tables[0]
    else:
        out = pd.concat(tables, axis=1, join="outer").fillna(0.0)
    out.index = out.index.astype(str)
    if not out.index.is_unique:
        raise ValueError("gene_features has duplicate part names in its index.")
    return out.astype(np.float32)

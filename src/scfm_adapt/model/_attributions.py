"""Pathway attributions: integrated gradients of a model output with respect to the
pathway tokens of an SCFM module (``tokenizer="pathway"``).

Each model class explains its own output: the embedding (:class:`SCFM`), a label's logit
(:class:`CellAnnotator`), a predicted response (:class:`PerturbationModel`); they share
:func:`pathway_attributions`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch


def pathway_attributions(
    module,
    batches,
    target: Callable[[torch.Tensor, dict, torch.Tensor], torch.Tensor],
    names: Sequence[str],
    obs_names,
    n_steps: int = 32,
) -> pd.DataFrame:
    """Integrated gradients of ``target(features, tensors, x_norm) -> (B,)`` with respect
    to the pathway tokens of ``module`` (an SCFM module with ``tokenizer="pathway"``), from
    the tokens of the average pretraining cell (``module.reference_input()``).

    The baseline is the average cell, not an empty one: attributions read "what in this
    cell's pathways, compared with a typical cell, moves the output", and the path stays
    among realistic token norms (from near-zero tokens the LayerNorms make the path so steep
    that the integral needs hundreds of steps).

    Returns cells × pathways; each row sums to ``target(cell) - target(baseline)`` up to the
    quadrature error, kept per cell in ``.attrs["completeness_gap"]``.
    """
    from ..nn import integrated_gradients

    enc = module.encoder
    was_training = module.training
    module.eval()
    rows, gaps = [], []
    try:
        for tensors in batches:
            x_norm, _ = module.normalize(tensors["X"].float(), tensors.get("batch"))
            inputs = enc.token_inputs(x_norm).detach()
            base = enc.token_inputs(module.reference_input()).detach().expand_as(inputs)

            def fn(h, tensors=tensors, x_norm=x_norm):
                return target(enc.features_from_inputs(h), tensors, x_norm)

            attr, gap = integrated_gradients(fn, inputs, base, n_steps)
            rows.append(attr.sum(-1).float().cpu())  # (B, P): summed over the token width
            gaps.append(gap.float().cpu())
    finally:
        module.train(was_training)
    df = pd.DataFrame(torch.cat(rows).numpy(), index=obs_names, columns=list(names))
    df.attrs["completeness_gap"] = torch.cat(gaps).numpy()
    return df

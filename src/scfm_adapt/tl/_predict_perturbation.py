"""``sfa.tl.predict_perturbation``: scanpy-style front end of PerturbationModel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from anndata import AnnData

from .._slots import SLOTS


def predict_perturbation(
    adata: AnnData,
    model,
    perturbations: str | Sequence[str],
    *,
    covariates: Mapping[str, str] | None = None,
    dose=None,
    n_samples: int | None = None,
    seed: int | None = None,
    interval: float = 0.9,
    key_added: str = SLOTS.perturbation,
) -> AnnData:
    """Predict perturbed cells from the control cells in ``adata``.

    Calls :meth:`~scfm_adapt.model.PerturbationModel.predict_perturbation` and records a
    summary in ``adata.uns[key_added]``: ``params``, ``ood_score`` per perturbation and
    the predicted mean deltas with their intervals (``delta``, ``delta_lower``,
    ``delta_upper``: genes x perturbations DataFrames). ``adata`` is not otherwise changed.

    Returns
    -------
    AnnData of predicted cells (see the model method).
    """
    pred = model.predict_perturbation(
        adata,
        perturbations,
        covariates=covariates,
        dose=dose,
        n_samples=n_samples,
        seed=seed,
        interval=interval,
    )
    info = pred.uns[SLOTS.perturbation]
    adata.uns[key_added] = {
        "params": dict(info["params"]),
        "ood_score": dict(info["ood_score"]),
        "delta": pred.varm[SLOTS.delta].copy(),
        "delta_lower": pred.varm[SLOTS.delta_lower].copy(),
        "delta_upper": pred.varm[SLOTS.delta_upper].copy(),
    }
    return pred

"""The latent anchor of a perturbation response: the simple models the learned response
starts from (torch).

In the (standardised) latent of the backbone, a training unit's *shift* is the mean latent
of its perturbed cells minus that of its context's control cells. The anchor predicts a
request's shift as the dose-weighted sum of its parts' shifts, each part's shift being,
from the most to the least specific:

1. its own shift in the request's context (a single-part unit of that context);
2. its mean shift in the other contexts (arithmetic);
3. for a part never perturbed alone in training, a ridge map of its features (e.g. GO),
   fitted on the parts perturbed alone, its strength chosen by leave-one-out over them;
4. when there are no such features, or leave-one-out does not find the map better than
   the mean by more than one standard error, the mean shift of every training unit.

These are the rules of the shipped mean-shift and additive baselines
(``scfm_adapt.baselines.shift_by_rule``), with the linear map added for unseen genes:
in any space of shifts (the backbone's latent, or log-normalised expression).
"""

from __future__ import annotations

import torch
from torch import nn

from ._perturbation_response import dose_scale

#: Ridge strengths (relative to the mean squared norm of the centred features) that the
#: feature map chooses from by leave-one-out; the mean shift alone is always a candidate.
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: The sets of a request's parts whose shifts :meth:`LatentAnchor.forward` sums.
PART_SETS = ("all", "arithmetic", "other")


class LatentAnchor(nn.Module):
    """Shifts ``(R, D)`` of requests in contexts (see the module's docstring).

    Built empty with its shapes (so that a checkpoint loads into it), then :meth:`fit` on
    training units. Part index ``n_parts`` stands for every unseen part, context ``-1``
    for a context without training units.
    """

    def __init__(self, latent_dim: int, n_parts: int, n_contexts: int, n_features: int):
        super().__init__()
        p1 = n_parts + 1
        self.n_parts, self.n_contexts = n_parts, n_contexts
        self.register_buffer("context_shift", torch.zeros(n_contexts, p1, latent_dim))
        self.register_buffer("context_known", torch.zeros(n_contexts, p1))
        self.register_buffer("part_shift", torch.zeros(p1, latent_dim))
        self.register_buffer("part_known", torch.zeros(p1))
        self.register_buffer("mean_shift", torch.zeros(latent_dim))
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_shift", torch.zeros(latent_dim))
        self.register_buffer("feature_map", torch.zeros(n_features, latent_dim))

    @torch.no_grad()
    def fit(
        self,
        unit_context: torch.Tensor,
        part_idx: torch.Tensor,
        dose: torch.Tensor,
        shifts: torch.Tensor,
        part_features: torch.Tensor | None = None,
    ) -> LatentAnchor:
        """Fit on training units: ``unit_context`` ``(U,)``, ``part_idx`` / ``dose``
        ``(U, K)`` (``-1`` pads), ``shifts`` ``(U, D)``; ``part_features`` ``(n_parts, F)``
        (zeros for a part without features)."""
        n_units, d = shifts.shape
        p = self.n_parts
        w = torch.zeros(n_units, p, dtype=shifts.dtype)
        valid = part_idx >= 0
        rows = torch.arange(n_units).unsqueeze(1).expand_as(part_idx)
        w.index_put_(
            (rows[valid], part_idx[valid]), dose_scale(dose[valid]).to(w.dtype), accumulate=True
        )
        single = (valid.sum(1) == 1) & (w.sum(1) > 0)
        # 1. and 2.: the shift of each single-part unit per unit of dose
        per_dose = shifts[single] / w[single].sum(1, keepdim=True)
        part_of = part_idx[single].max(1).values
        # sums and counts per (context, part); over all contexts for the part's own
        cs = torch.zeros(self.n_contexts, p, d, dtype=shifts.dtype)
        cn = torch.zeros(self.n_contexts, p, dtype=shifts.dtype)
        ctx = unit_context[single]
        cs.index_put_((ctx, part_of), per_dose, accumulate=True)
        cn.index_put_((ctx, part_of), torch.ones_like(part_of, dtype=shifts.dtype), accumulate=True)
        self.context_shift[:, :p] = cs / cn.clamp(min=1).unsqueeze(-1)
        self.context_known[:, :p] = (cn > 0).to(self.context_known.dtype)
        counts = cn.sum(0)
        known = counts > 0
        part_shift = cs.sum(0) / counts.clamp(min=1).unsqueeze(-1)
        self.part_shift[:p] = part_shift
        self.part_known[:p] = known.to(self.part_known.dtype)
        self.mean_shift.copy_(shifts.mean(0))  # 4.: of every unit, as the baselines
        # 3.: the feature map, fitted on the parts perturbed alone that have features
        self.feature_shift.copy_(self.mean_shift)
        if part_features is not None and part_features.shape[1] > 0:
            has = part_features.abs().sum(1) > 0
            fit = known & has
            if int(fit.sum()) >= 3:
                self._fit_feature_map(part_features[fit].to(shifts.dtype), part_shift[fit])
        return self

    def _fit_feature_map(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Ridge from features to part shifts, its strength chosen by exact leave-one-out
        error over the parts, kept only when it beats the mean of these parts by more
        than one standard error of the paired per-part differences (the one-standard-error
        rule: with few parts, a map that wins by less is not told apart from the mean);
        else no map, and the mean shift of every unit stays."""
        n = x.shape[0]
        xm, ym = x.mean(0), y.mean(0)
        xc, yc = x - xm, y - ym
        kern = xc @ xc.T
        scale = float(kern.diagonal().mean().clamp(min=1e-12))
        # leave-one-out of the mean alone: each part against the mean of the others
        err_mean = (yc * n / (n - 1)).pow(2).mean(1)
        best, best_err = None, None
        eye = torch.eye(n, dtype=x.dtype)
        for lam in RIDGE_GRID:
            hat = kern @ torch.linalg.inv(kern + lam * scale * eye)
            # the fitted mean is part of the fit: its leverage 1/n adds to the ridge's
            leverage = hat.diagonal() + 1.0 / n
            loo = (yc - hat @ yc) / (1 - leverage).clamp(min=1e-6).unsqueeze(1)
            err = loo.pow(2).mean(1)
            if best_err is None or float(err.mean()) < float(best_err.mean()):
                best_err, best = err, lam
        gain = err_mean - best_err  # per part: how much the map beats the mean
        se = float(gain.std()) / n**0.5 if n > 1 else float("inf")
        if float(gain.mean()) > se:
            self.feature_mean.copy_(xm)
            self.feature_shift.copy_(ym)
            alpha = torch.linalg.solve(kern + best * scale * eye, yc)
            self.feature_map.copy_(xc.T @ alpha)

    def arithmetic_parts(self, context: torch.Tensor, part_idx: torch.Tensor) -> torch.Tensor:
        """``(R, K)``: which parts of each request take their shift from other contexts
        (rule 2: perturbed alone in training, but not in the request's context)."""
        idx = part_idx.clamp(min=0)
        ctx = context.clamp(min=0).unsqueeze(1).expand_as(idx)
        in_ctx = (self.context_known[ctx, idx] > 0) & (context >= 0).unsqueeze(1)
        return (part_idx >= 0) & (self.part_known[idx] > 0) & ~in_ctx

    def forward(
        self,
        context: torch.Tensor,
        part_idx: torch.Tensor,
        features: torch.Tensor,
        dose: torch.Tensor,
        parts: str = "all",
    ) -> torch.Tensor:
        """Shifts ``(R, D)`` of requests: ``context`` ``(R,)`` (``-1``: a context without
        training units), ``part_idx`` ``(R, K)``, ``features`` ``(R, K, F)``, ``dose``
        ``(R, K)``. ``parts``: sum the shifts of ``"all"`` parts, of the
        ``"arithmetic"`` ones only (parts that take their shift from other contexts,
        rule 2), or of the ``"other"`` ones; the last two add up to the first."""
        if parts not in PART_SETS:
            raise ValueError(f"parts={parts!r}; choose one of {PART_SETS}.")
        valid = part_idx >= 0
        idx = part_idx.clamp(min=0)
        ctx = context.clamp(min=0).unsqueeze(1).expand_as(idx)
        in_ctx = (self.context_known[ctx, idx] > 0) & (context >= 0).unsqueeze(1)
        if parts != "all":
            arithmetic = self.arithmetic_parts(context, part_idx)
            valid = valid & (arithmetic if parts == "arithmetic" else ~arithmetic)
        if features.shape[-1]:
            has = features.abs().sum(-1, keepdim=True) > 0
            from_features = self.feature_shift + (features - self.feature_mean) @ self.feature_map
            unseen = torch.where(has, from_features, self.mean_shift)
        else:
            unseen = self.mean_shift.expand(*idx.shape, -1)
        seen = (self.part_known[idx] > 0).unsqueeze(-1)
        shift = torch.where(seen, self.part_shift[idx], unseen)
        shift = torch.where(in_ctx.unsqueeze(-1), self.context_shift[ctx, idx], shift)
        w = (dose_scale(dose) * valid).unsqueeze(-1)
        return (shift * w).sum(1)

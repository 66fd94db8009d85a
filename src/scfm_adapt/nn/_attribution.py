"""Integrated gradients: how much each input token moves a scalar output."""

from __future__ import annotations

from collections.abc import Callable

import torch


def integrated_gradients(
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    n_steps: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients (Sundararajan et al. 2017) of ``fn`` along the straight path
    from ``baseline`` to ``inputs``, by the midpoint rule over ``n_steps``.

    ``fn`` maps a batch of inputs ``(B, ...)`` to one number per cell ``(B,)``. The
    attributions (same shape as ``inputs``) sum, per cell, to ``fn(inputs) - fn(baseline)``
    up to the quadrature error (completeness); the second output is that gap, ``(B,)``, to
    check the step count.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps}; use at least 1.")
    inputs, baseline = inputs.detach(), baseline.detach()
    diff = inputs - baseline
    total = torch.zeros_like(inputs)
    for k in range(n_steps):
        point = (baseline + (k + 0.5) / n_steps * diff).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(fn(point).sum(), point)
        total += grad
    attr = diff * total / n_steps
    with torch.no_grad():
        gap = fn(inputs) - fn(baseline) - attr.flatten(1).sum(1)
    return attr, gap

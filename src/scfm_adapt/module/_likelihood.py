"""scvi-tools' negative binomial with a per-gene dispersion, its log-likelihood computed
with the per-gene terms once per gene rather than once per (cell, gene) entry.

scvi-tools broadcasts the dispersion ``theta`` to the counts' shape, so ``lgamma(theta)``
(and its ``digamma`` gradient) and ``theta * log(theta)`` run on every entry of a
minibatch. With one ``theta`` per gene they are the same for every cell; computing them
on ``(G,)`` gives the same log-likelihood for less work (``benchmarks/throughput.py``).
"""

from __future__ import annotations

import torch
from scvi.distributions import NegativeBinomial


class GeneNegativeBinomial(NegativeBinomial):
    """:class:`scvi.distributions.NegativeBinomial` (mean ``mu``, inverse dispersion
    ``theta``) whose ``log_prob`` evaluates the terms of ``theta`` alone on ``theta``'s own
    shape (one value per gene) before broadcasting. Same value and gradients."""

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor | None = None):
        super().__init__(mu=mu, theta=theta, scale=scale)
        self.theta_genes = theta  # before broadcasting

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self.on_mps:  # scvi-tools' own path works around lgamma on MPS
            return super().log_prob(value)
        eps, mu, theta, th = self._eps, self.mu, self.theta, self.theta_genes
        log_theta_mu = torch.log(theta + mu + eps)
        per_gene = th * torch.log(th + eps) - torch.lgamma(th)  # (G,) or theta's shape
        return (
            per_gene
            - theta * log_theta_mu
            + value * (torch.log(mu + eps) - log_theta_mu)
            + torch.lgamma(value + theta)
            - torch.lgamma(value + 1)
        )

"""Perturbation response heads: a perturbation encoder and a latent-delta network (torch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import PartAttentionPool

#: How a perturbation's parts are read into one embedding (see :class:`ResponseHead`).
PART_POOLS = ("sum", "attention")


def dose_scale(dose: torch.Tensor) -> torch.Tensor:
    """How strongly a part enters the perturbation embedding at ``dose``:
    ``log1p(dose) / log 2`` (0 at dose 0, 1 at dose 1, sub-linear above)."""
    return torch.log1p(dose.clamp(min=0)) / math.log(2.0)


class ResponseHead(nn.Module):
    """Embeds a perturbation and maps a control cell's latent to its perturbed latent.

    A part (a gene, a drug, a stimulus) is embedded as ``W f + r``: ``f`` its feature
    vector (e.g. GO features; zeros when it has none) and ``r`` a learned vector for parts
    seen in training (zero for unseen parts). A perturbation is the dose-weighted *sum* of
    its parts' embeddings (``part_pool="sum"``), or that sum plus an attention read-out
    of the set (``"attention"``, :class:`~scfm_adapt.nn.PartAttentionPool`, which starts
    as the sum): either way combinations are order-invariant. The delta of a cell with
    (standardised) latent ``z`` is ``net(z, e) - net(z, 0)``: exactly zero for the control
    (``e = 0``), and it depends on the cell's state.
    """

    def __init__(
        self,
        latent_dim: int,
        n_features: int,
        n_parts: int,
        emb_dim: int = 64,
        hidden: int = 256,
        n_layers: int = 2,
        dropout: float = 0.1,
        part_pool: str = "sum",
    ):
        super().__init__()
        if part_pool not in PART_POOLS:
            raise ValueError(f"part_pool={part_pool!r}; choose one of {PART_POOLS}.")
        self.latent_dim, self.n_features, self.n_parts = latent_dim, n_features, n_parts
        self.pool = None
        if part_pool == "attention":
            self.pool = PartAttentionPool(emb_dim, 4 if emb_dim % 4 == 0 else 1)
        self.proj = nn.Linear(n_features, emb_dim, bias=False) if n_features else None
        # row n_parts: every unseen part (kept at zero)
        self.part_embed = nn.Embedding(n_parts + 1, emb_dim, padding_idx=n_parts)
        nn.init.normal_(self.part_embed.weight, std=0.1)
        with torch.no_grad():
            self.part_embed.weight[n_parts].zero_()
        layers: list[nn.Module] = []
        d = latent_dim + emb_dim
        for _ in range(n_layers):
            layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)]
            d = hidden
        out = nn.Linear(d, latent_dim)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def embed(
        self, part_idx: torch.Tensor, features: torch.Tensor, dose: torch.Tensor
    ) -> torch.Tensor:
        """Perturbation embeddings ``(P, emb_dim)``.

        ``part_idx`` ``(P, K)`` vocabulary indices (``n_parts`` for unseen parts, ``-1`` for
        padding), ``features`` ``(P, K, n_features)``, ``dose`` ``(P, K)``.
        """
        mask = (part_idx >= 0).to(features.dtype if features.numel() else torch.float32)
        idx = part_idx.clamp(min=0)
        phi = self.part_embed(idx)
        if self.proj is not None:
            phi = phi + self.proj(features)
        w = dose_scale(dose) * mask
        if self.pool is not None:
            return self.pool(phi, w, part_idx >= 0)
        return (phi * w.unsqueeze(-1)).sum(1)

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Latent delta ``(N, latent_dim)`` of standardised latents ``z`` under embeddings
        ``e`` (``(N, emb_dim)``, or ``(emb_dim,)`` for all cells)."""
        if e.dim() == 1:
            e = e.expand(z.shape[0], -1)
        both = torch.cat([torch.cat([z, e], 1), torch.cat([z, torch.zeros_like(e)], 1)], 0)
        out = self.net(both)
        return out[: z.shape[0]] - out[z.shape[0] :]


def mmd2(x: torch.Tensor, y: torch.Tensor, scales=(0.25, 1.0, 4.0)) -> torch.Tensor:
    """Biased squared MMD with a sum of RBF kernels, batched: ``x``/``y`` ``(U, B, D)``.

    Bandwidths are ``scales`` times the mean squared distance between the two sets
    (detached), so the loss is scale-free.
    """
    xx, yy, xy = torch.cdist(x, x) ** 2, torch.cdist(y, y) ** 2, torch.cdist(x, y) ** 2
    bw = xy.detach().mean(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    total = 0.0
    for s in scales:
        g = 1.0 / (s * bw)
        total = total + (
            torch.exp(-g * xx).mean((1, 2))
            + torch.exp(-g * yy).mean((1, 2))
            - 2 * torch.exp(-g * xy).mean((1, 2))
        )
    return total


def fit_response_head(
    head: ResponseHead,
    zs: torch.Tensor,
    units: list[int],
    control_cells: list,
    unit_cells: list,
    requests: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    anchor_shift: torch.Tensor,
    *,
    steps: int,
    cells_per_unit: int,
    units_per_step: int,
    lr: float,
    weight_decay: float,
    mmd_weight: float,
    grad_clip: float,
    rng,
    on_step=None,
) -> list[float]:
    """Train ``head`` on training units ``units`` (its in-bag units); returns the loss every
    50 steps (and at the last).

    Each step draws ``units_per_step`` of them and ``cells_per_unit`` control and perturbed
    cells of each (``control_cells[i]`` / ``unit_cells[i]``: index arrays into ``zs``, the
    standardised latents). The prediction of a control cell is its latent plus the unit's
    ``anchor_shift`` plus the head's delta; the loss is the squared error of the mean
    prediction plus ``mmd_weight`` times the MMD between predicted and perturbed cells.
    ``requests``: every unit's ``(part_idx, features, dose)``; ``rng``: a NumPy generator;
    ``on_step()`` is called after each step. Raises ``FloatingPointError`` on a non-finite
    loss (the caller names the fix).
    """
    u_idx, u_feat, u_dose = requests

    def loss_of_a_step() -> torch.Tensor:
        pick = rng.choice(units, size=min(units_per_step, len(units)), replace=False)
        xc = torch.stack([zs[rng.choice(control_cells[i], cells_per_unit)] for i in pick])
        yp = torch.stack([zs[rng.choice(unit_cells[i], cells_per_unit)] for i in pick])
        e = head.embed(u_idx[pick], u_feat[pick], u_dose[pick])  # (U, emb)
        u, b, d = xc.shape
        delta = head(xc.reshape(u * b, d), e.repeat_interleave(b, 0)).view(u, b, d)
        pred = xc + anchor_shift[torch.as_tensor(pick)].unsqueeze(1) + delta
        loss = ((pred.mean(1) - yp.mean(1)) ** 2).mean(-1) + mmd_weight * mmd2(pred, yp)
        return loss.mean()

    return optimise(head, loss_of_a_step, steps, lr, weight_decay, grad_clip, on_step)


def optimise(
    module: nn.Module,
    loss_of_a_step,
    steps: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    on_step=None,
) -> list[float]:
    """The loop both response fits share: AdamW on ``module``'s parameters for ``steps``
    steps of ``loss_of_a_step()`` (which draws its own batch), gradients clipped to
    ``grad_clip``; returns the loss every 50 steps (and at the last). Raises
    ``FloatingPointError`` on a non-finite loss."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    module.train()
    for step in range(steps):
        loss = loss_of_a_step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the response loss became {loss.item()} at step {step}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
        if on_step is not None:
            on_step()
    return losses

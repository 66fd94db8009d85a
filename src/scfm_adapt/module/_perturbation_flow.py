"""A perturbation-conditioned flow over a cell's latent tokens: a DiT velocity field
(adaLN conditioning on the perturbation and its context) trained by flow matching from
control cells to perturbed cells (torch).

The flow starts at a control cell's latent, moved by the anchor (the baselines' shift),
and carries it towards the perturbed cells of the same context. Its velocity is the DiT's
output under the perturbation's embedding minus its output under the null embedding (the
control): exactly zero for the control and for dose 0, and zero everywhere at
initialisation (the DiT's output layer starts at zero), so an untrained flow leaves the
anchored cell where it is. Classifier-free guidance is a scale of that difference.

The context (cell type, line, donor: one category per training context) conditions both
branches through adaLN as well, so the same perturbation may move cells of different
contexts differently; it is replaced by its null category for a share of the training
units (classifier-free dropout), and a context the flow never trained on (never seen, or
seen only through its control cells, as a held-out cell type) takes the null.

Where the backbone has a trained prior (its stage-2 DiT over the same tokens), the flow's
DiT can start as a copy of it (``prior=``): the flow then begins from a network that
already knows the geometry of the latent cells, and only the perturbation's embedding
(zero at initialisation, so the velocity still starts at exactly zero) is new.
"""

from __future__ import annotations

import copy

import torch

from ..nn import DiT
from ..nn._embedding import CategoricalEmbedder, ContinuousEmbedder
from ._perturbation_response import ResponseHead, optimise


class ResponseFlow(ResponseHead):
    """Same interface as :class:`ResponseHead` (``embed``, then ``forward(z, e)`` gives a
    latent delta), with a DiT velocity field in place of the head's network.

    The perturbation's parts are embedded as in :class:`ResponseHead` (by default read
    as a set by attention pooling, ``part_pool="attention"``: order-invariant); that
    embedding, and the cell's context (``n_contexts`` categories, index ``-1`` for the
    null), condition every DiT block through adaLN (FiLM). ``forward(z, e, context)``
    integrates the flow from ``z`` (standardised latents, ``(N, n_tokens * token_dim)``)
    with ``n_steps`` Euler steps and returns where it ends minus ``z``. With ``noise > 0``
    each cell starts from ``z`` plus Gaussian noise of that scale (drawn from torch's
    global generator, so a seed fixes it), and the displacement is measured from the
    noisy start: different seeds give different cells, an untrained flow none.
    ``guidance`` scales the velocity (classifier-free guidance; chosen on held-out
    units by the model class).
    """

    #: The name of the context's categorical condition in the DiT.
    CONTEXT = "perturbation_context"

    def __init__(
        self,
        n_tokens: int,
        token_dim: int,
        n_features: int,
        n_parts: int,
        emb_dim: int = 64,
        hidden: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        n_steps: int = 8,
        noise: float = 0.1,
        guidance: float = 1.0,
        prior: DiT | None = None,
        n_contexts: int = 0,
        p_uncond_context: float = 0.2,
        part_pool: str = "attention",
    ):
        super().__init__(
            n_tokens * token_dim, n_features, n_parts, emb_dim, 8, 1, 0.0, part_pool=part_pool
        )
        del self.net  # the DiT replaces the head's network
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.n_steps, self.noise, self.guidance = n_steps, noise, guidance
        self.n_contexts, self.p_uncond_context = n_contexts, p_uncond_context
        if prior is not None:
            self.dit = _dit_from_prior(prior, n_tokens, token_dim, emb_dim)
        else:
            self.dit = DiT(
                n_tokens,
                token_dim,
                hidden=hidden,
                depth=depth,
                n_heads=n_heads,
                n_continuous=emb_dim,
            )
            # adaLN-Zero would leave DiT(e) - DiT(null) without any gradient: both branches
            # see the same features until a modulation moves, and no modulation gets a
            # gradient while the output layer is zero. A small random output layer breaks
            # the tie; the velocity is still exactly zero at init, as e enters only through
            # the modulations.
            torch.nn.init.normal_(self.dit.final.linear.weight, std=0.02)
        if n_contexts:
            hidden_dim = self.dit.x_embed.out_features
            ctx = CategoricalEmbedder(n_contexts, hidden_dim, p_uncond_context)
            # every context starts at the null's embedding: at zero, the prior's own
            # (unconditional) modulation is unchanged
            torch.nn.init.zeros_(ctx.table.weight)
            self.dit.cat_embed[self.CONTEXT] = ctx

    @torch.no_grad()
    def null_untrained_contexts(self, trained) -> None:
        """Give every context not in ``trained`` (indices whose units the flow was trained
        on) the null context's embedding: a context seen only through its control cells,
        or only in left-out units, reads as one the flow never saw, not as an untrained
        row."""
        if not self.n_contexts:
            return
        emb = self.dit.cat_embed[self.CONTEXT]
        table = emb.table.weight  # rows 0..n_contexts - 1, then the null
        for i in range(self.n_contexts):
            if i not in trained:
                table[i] = table[emb.null_index]

    def _context_condition(self, context: torch.Tensor | None, n: int) -> dict:
        """The DiT's context condition for ``n`` cells (``-1`` or ``None``: the null)."""
        if not self.n_contexts:
            return {}
        null = self.dit.cat_embed[self.CONTEXT].null_index
        if context is None:
            return {self.CONTEXT: torch.full((n,), null, dtype=torch.long)}
        context = torch.as_tensor(context, dtype=torch.long).expand(n)
        unseen = (context < 0) | (context >= self.n_contexts)
        return {self.CONTEXT: torch.where(unseen, null, context)}

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity ``(N, D)`` at flattened latents ``x`` and times ``t`` in [0, 1] under
        embeddings ``e`` ``(N, emb_dim)`` in contexts ``context`` ``(N,)``: the DiT under
        ``e`` minus under the null perturbation, both in the same context."""
        n = x.shape[0]
        tok = x.view(n, self.n_tokens, self.token_dim)
        conditions = {"continuous": torch.cat([e, torch.zeros_like(e)])}
        for name, idx in self._context_condition(context, n).items():
            conditions[name] = torch.cat([idx, idx]).to(x.device)
        both = self.dit(torch.cat([tok, tok]), torch.cat([t, t]) * 1000.0, conditions)
        return (both[:n] - both[n:]).reshape(n, -1)

    def forward(
        self, z: torch.Tensor, e: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        if e.dim() == 1:
            e = e.expand(z.shape[0], -1)
        start = z
        if self.noise > 0:
            start = z + self.noise * torch.randn(z.shape, dtype=z.dtype).to(z.device)
        x, dt = start, 1.0 / self.n_steps
        for k in range(self.n_steps):
            t = torch.full((z.shape[0],), k * dt, device=z.device)
            x = x + dt * self.guidance * self.velocity(x, t, e, context)
        return x - start


def _dit_from_prior(prior: DiT, n_tokens: int, token_dim: int, emb_dim: int) -> DiT:
    """A trainable copy of the backbone's prior DiT whose continuous condition is the
    perturbation's embedding (width ``emb_dim``).

    The prior's categorical conditions stay, and the flow leaves them null (the prior's
    unconditional mode, learned through classifier-free dropout). The new embedding's
    projection starts at zero, so ``DiT(e) == DiT(null)`` and the velocity is exactly
    zero at initialisation; it still gets a gradient, as the copied modulations are not
    zero.
    """
    if (prior.n_tokens, prior.token_dim) != (n_tokens, token_dim):
        raise ValueError(
            f"The prior's tokens are {prior.n_tokens} x {prior.token_dim}, the flow's "
            f"{n_tokens} x {token_dim}: a prior of another backbone cannot start this flow."
        )
    dit = copy.deepcopy(prior).requires_grad_(True).train()
    hidden = dit.x_embed.out_features
    dit.cont_embed = ContinuousEmbedder(emb_dim, hidden)
    torch.nn.init.zeros_(dit.cont_embed.proj.weight)
    torch.nn.init.zeros_(dit.cont_embed.proj.bias)
    return dit


def fit_response_flow(
    flow: ResponseFlow,
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
    grad_clip: float,
    rng,
    on_step=None,
    contexts: torch.Tensor | None = None,
) -> list[float]:
    """Flow matching with minibatch optimal-transport pairs: each step draws
    ``units_per_step`` of ``units`` and ``cells_per_unit`` control and perturbed cells of
    each; a control cell starts at its latent plus the unit's ``anchor_shift`` (plus the
    flow's start noise) and is paired with a perturbed cell by an exact assignment on
    squared distances; the loss is the squared error of the velocity at a random point of
    the straight path between them against the path's direction. ``contexts``: every
    unit's context index (for a flow with ``n_contexts``), replaced by the null for a
    share ``flow.p_uncond_context`` of the drawn units; after training, the contexts of
    none of ``units`` take the null's embedding
    (:meth:`ResponseFlow.null_untrained_contexts`). Other arguments as
    :func:`~scfm_adapt.module.fit_response_head`. Returns the loss every 50 steps."""
    from scipy.optimize import linear_sum_assignment

    u_idx, u_feat, u_dose = requests

    def loss_of_a_step() -> torch.Tensor:
        pick = rng.choice(units, size=min(units_per_step, len(units)), replace=False)
        x0 = torch.stack([zs[rng.choice(control_cells[i], cells_per_unit)] for i in pick])
        x1 = torch.stack([zs[rng.choice(unit_cells[i], cells_per_unit)] for i in pick])
        x0 = x0 + anchor_shift[torch.as_tensor(pick)].unsqueeze(1)
        x0 = x0 + flow.noise * torch.as_tensor(rng.standard_normal(x0.shape), dtype=x0.dtype)
        for u in range(len(pick)):  # optimal-transport pairs within each unit
            _, col = linear_sum_assignment(torch.cdist(x0[u], x1[u]).pow(2).numpy())
            x1[u] = x1[u][torch.as_tensor(col)]
        e = flow.embed(u_idx[pick], u_feat[pick], u_dose[pick])  # (U, emb)
        u, b, d = x0.shape
        t = torch.as_tensor(rng.random((u, b, 1)), dtype=x0.dtype)
        xt = (1 - t) * x0 + t * x1
        ctx = None
        if flow.n_contexts and contexts is not None:
            ctx = contexts[torch.as_tensor(pick)].clone()
            ctx[torch.as_tensor(rng.random(u) < flow.p_uncond_context)] = -1  # the null
            ctx = ctx.repeat_interleave(b)
        v = flow.velocity(xt.reshape(u * b, d), t.reshape(-1), e.repeat_interleave(b, 0), ctx)
        return (v.view(u, b, d) - (x1 - x0)).pow(2).mean()

    losses = optimise(flow, loss_of_a_step, steps, lr, weight_decay, grad_clip, on_step)
    if flow.n_contexts and contexts is not None:
        flow.null_untrained_contexts({int(c) for c in contexts[torch.as_tensor(units)] if c >= 0})
    return losses

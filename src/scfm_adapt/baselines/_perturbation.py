"""Simple baselines for perturbation-response prediction, exactly defined, on any data.

All baselines learn from a *training* AnnData of raw counts with a perturbation column and
optional context columns (cell type, cell line, ...). A *unit* is one (context,
perturbation) pair. Expression is log-normalised (``log1p`` of counts scaled to 10,000 per
cell). The *delta* of a training unit is its mean expression minus the mean of the control
cells of the same context. Each baseline predicts a delta for a requested unit; the
predicted cells are the context's control cells plus that delta
(:func:`shifted_cells`), except for :class:`ScVILatentArithmetic`, which samples counts.

Perturbation names are canonical: a combination ``"B+A"`` is ``"A+B"`` (parts sorted,
control parts dropped), see :func:`scfm_adapt.data.canonical_perturbation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..data import canonical_perturbation, context_labels, split_perturbation
from ..metrics import lognorm


def unit_means(
    values: np.ndarray,
    obs: pd.DataFrame,
    perturbation_key: str,
    control_group: str,
    context_keys: Sequence[str] = (),
    delimiter: str = "+",
) -> tuple[dict, dict, dict]:
    """Per-unit means of ``values`` (cells x features: expression, latents, ...).

    Returns ``means`` ``{(context, perturbation): mean}`` over every unit, ``ctrl``
    ``{context: mean of its control cells}`` and ``deltas`` ``{(context, perturbation):
    mean - ctrl[context]}`` for the non-control units whose context has controls.
    """
    perts = np.array(
        [
            canonical_perturbation(p, control_group, delimiter)
            for p in obs[perturbation_key].astype(str)
        ],
        dtype=object,
    )
    frame = pd.DataFrame({"c": context_labels(obs, context_keys), "p": perts})
    groups = frame.groupby(["c", "p"], sort=True).indices
    means = {(c, p): values[idx].mean(0) for (c, p), idx in groups.items()}
    ctrl = {c: m for (c, p), m in means.items() if p == control_group}
    deltas = {
        (c, p): m - ctrl[c] for (c, p), m in means.items() if p != control_group and c in ctrl
    }
    return means, ctrl, deltas


class PerturbationTable:
    """Per-unit mean log-normalised expression and deltas of a training set.

    Parameters
    ----------
    adata
        Training cells, raw counts in ``X`` or ``layer``.
    perturbation_key, control_group
        The obs column naming each cell's perturbation, and its control value.
    context_keys
        obs columns whose values together make a cell's context (``()``: one context).
    delimiter
        Separator of combination parts.

    Attributes
    ----------
    means
        ``{(context, perturbation): mean expression}``.
    ctrl
        ``{context: mean expression of its control cells}``.
    deltas
        ``{(context, perturbation): delta}`` for every non-control unit whose context has
        control cells.
    """

    def __init__(
        self,
        adata,
        perturbation_key: str,
        control_group: str,
        context_keys: Sequence[str] = (),
        layer: str | None = None,
        delimiter: str = "+",
    ):
        self.control_group, self.delimiter = control_group, delimiter
        self.context_keys = list(context_keys)
        self.var_names = list(map(str, adata.var_names))
        x = lognorm(adata.X if layer is None else adata.layers[layer])
        self.means, self.ctrl, self.deltas = unit_means(
            x, adata.obs, perturbation_key, control_group, self.context_keys, delimiter
        )
        if not self.deltas:
            raise ValueError(
                "No training unit has both perturbed cells and control cells in its context: "
                f"check control_group={control_group!r} and context_keys={self.context_keys}."
            )

    def parts(self, perturbation: str) -> list[str]:
        return split_perturbation(perturbation, self.control_group, self.delimiter)

    def canonical(self, perturbation: str) -> str:
        return canonical_perturbation(perturbation, self.control_group, self.delimiter)

    @property
    def perturbations(self) -> list[str]:
        return sorted({p for _, p in self.deltas})

    def average_delta(self) -> np.ndarray:
        """Mean delta over every training unit (the 'all perturbations' shift)."""
        return np.mean(list(self.deltas.values()), axis=0)


def shift_by_rule(
    deltas: Mapping[tuple[str, str], np.ndarray],
    perturbation: str,
    context: str,
    parts: Sequence[str] = (),
    rule: str = "mean",
    delimiter: str = "+",
) -> np.ndarray:
    """The shift the mean-shift and additive baselines use, for vectors of any space.

    ``rule="mean"``: the average delta of ``perturbation`` over the *other* contexts that
    have it; if none has it, the average delta of all units.
    ``rule="additive"``: for a combination (``len(parts) > 1``), the sum over its parts of
    each part's single delta: in ``context`` if that unit exists, else averaged over the
    contexts that have it, else the average delta of all units. A single perturbation
    falls back to ``"mean"``.
    """
    if rule not in ("mean", "additive"):
        raise ValueError(f"rule={rule!r}; choose 'mean' or 'additive'.")
    everything = np.mean(list(deltas.values()), axis=0)

    def across(p: str, exclude: str | None) -> np.ndarray | None:
        found = [d for (c, q), d in deltas.items() if q == p and c != exclude]
        return np.mean(found, axis=0) if found else None

    if rule == "additive" and len(parts) > 1:
        total = np.zeros_like(everything)
        for g in parts:
            own = deltas.get((context, g))
            if own is None:
                own = across(g, None)
            total = total + (everything if own is None else own)
        return total
    found = across(perturbation, context)
    return everything if found is None else found


def mean_shift_delta(table: PerturbationTable, perturbation: str, context: str = "") -> np.ndarray:
    """Mean-shift baseline: the average training delta of the same perturbation in other
    contexts, or of all perturbations when no other context has it."""
    p = table.canonical(perturbation)
    return shift_by_rule(table.deltas, p, context, table.parts(p), "mean", table.delimiter)


def additive_delta(table: PerturbationTable, perturbation: str, context: str = "") -> np.ndarray:
    """Additive baseline for combinations: ``ΔA + ΔB (+ ...)``, each part's single delta (in
    this context if measured there, else averaged over contexts, else the average delta of
    all units). Single perturbations get :func:`mean_shift_delta`."""
    p = table.canonical(perturbation)
    return shift_by_rule(table.deltas, p, context, table.parts(p), "additive", table.delimiter)


def shifted_cells(ctrl_lognorm: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Predicted cells of a shift baseline: each control cell (log-normalised) plus ``delta``
    (no change: ``delta = 0``)."""
    return np.asarray(ctrl_lognorm, float) + np.asarray(delta, float)[None, :]


class LinearPCARidge:
    """Linear baseline of Ahlmann-Eltze, Huber & Anders (2024): ``Δ ≈ b + G W pᵀ``.

    - ``G`` (genes x ``n_components``): the top principal axes of the training units'
      mean expression (genes as rows), fitted with an SVD of the centred means.
    - ``p``: the unit's features, the concatenation of (a) the perturbation's features, the
      sum over its parts of ``pert_features[part]`` (a gene → vector table, e.g.
      :func:`scfm_adapt.datasets.go_gene_features`), or, for a part that is a measured gene
      without a row there, that gene's row of ``G``; and (b) the context: its control mean
      projected on ``G`` (after subtracting the average control mean).
    - ``b``: the average training delta; ``W`` is the ridge solution
      ``(GᵀG + λI)⁻¹ Gᵀ (Y - b) P (PᵀP + λI)⁻¹`` over the training units' deltas ``Y``.

    A part with neither features nor a measured gene contributes zeros (the prediction
    then relies on the context and the bias).
    """

    def __init__(
        self,
        n_components: int = 10,
        ridge: float = 0.1,
        pert_features: pd.DataFrame | None = None,
    ):
        self.n_components, self.ridge = n_components, ridge
        self.pert_features = pert_features

    def _part_vector(self, part: str) -> np.ndarray:
        f = self.pert_features
        if f is not None and part in f.index:
            v = f.loc[part].to_numpy(float)
            return v / max(np.linalg.norm(v), 1e-12)
        if part in self._gene_index:
            v = self.G[self._gene_index[part]]
            return v / max(np.linalg.norm(v), 1e-12) if f is None else np.zeros(f.shape[1])
        return np.zeros(f.shape[1] if f is not None else self.G.shape[1])

    def _features(self, perturbation: str, ctx_mean: np.ndarray) -> np.ndarray:
        parts = self.table.parts(self.table.canonical(perturbation))
        pv = np.sum([self._part_vector(g) for g in parts], axis=0) if parts else 0.0
        dim = self.pert_features.shape[1] if self.pert_features is not None else self.G.shape[1]
        pv = np.zeros(dim) + pv
        cv = (np.asarray(ctx_mean, float) - self.ctrl_center) @ self.G
        return np.concatenate([pv, cv])

    def fit(self, table: PerturbationTable) -> LinearPCARidge:
        self.table = table
        self._gene_index = {g: i for i, g in enumerate(table.var_names)}
        units = sorted(table.deltas)
        means = np.stack(list(table.means.values()), axis=1)  # genes x units
        centred = means - means.mean(1, keepdims=True)
        u, _, _ = np.linalg.svd(centred, full_matrices=False)
        self.G = u[:, : min(self.n_components, u.shape[1])]
        self.ctrl_center = np.mean(list(table.ctrl.values()), axis=0)
        Y = np.stack([table.deltas[k] for k in units], axis=1)  # genes x units
        self.b = Y.mean(1)
        P = np.stack([self._features(p, table.ctrl[c]) for c, p in units])  # units x F
        lam = self.ridge
        left = np.linalg.solve(self.G.T @ self.G + lam * np.eye(self.G.shape[1]), self.G.T)
        right = np.linalg.solve(P.T @ P + lam * np.eye(P.shape[1]), np.eye(P.shape[1]))
        self.W = left @ (Y - self.b[:, None]) @ P @ right
        return self

    def predict_delta(self, perturbation: str, ctrl_mean: np.ndarray) -> np.ndarray:
        """Predicted delta of ``perturbation`` in a context whose control cells have mean
        log-normalised expression ``ctrl_mean``."""
        return self.b + self.G @ self.W @ self._features(perturbation, ctrl_mean)


class ScVILatentArithmetic:
    """scGen-style latent arithmetic on an scVI model.

    ``fit`` trains :class:`scvi.model.SCVI` on the training counts and records each unit's
    mean latent (posterior means). ``predict`` encodes the requested control cells, adds the
    latent shift given by :func:`shift_by_rule` on the latent deltas (``rule="mean"``: the
    same perturbation in other contexts, else all perturbations; ``"additive"``: sum of the
    parts' shifts for combinations), decodes at each control cell's observed library and
    draws counts from the NB (``output="sample"``) or returns the decoded means
    (``"mean"``). Returns log-normalised cells.
    """

    def __init__(
        self,
        perturbation_key: str,
        control_group: str,
        context_keys: Sequence[str] = (),
        layer: str | None = None,
        delimiter: str = "+",
        n_latent: int = 10,
        max_epochs: int = 200,
        seed: int = 0,
    ):
        self.perturbation_key, self.control_group = perturbation_key, control_group
        self.context_keys, self.layer, self.delimiter = list(context_keys), layer, delimiter
        self.n_latent, self.max_epochs, self.seed = n_latent, max_epochs, seed

    def fit(self, adata_train, **train_kwargs) -> ScVILatentArithmetic:
        import scvi

        scvi.settings.seed = self.seed
        a = adata_train.copy()
        scvi.model.SCVI.setup_anndata(a, layer=self.layer)
        self.model = scvi.model.SCVI(a, n_latent=self.n_latent)
        train_kwargs.setdefault("enable_progress_bar", False)
        self.model.train(max_epochs=self.max_epochs, **train_kwargs)
        z = self.model.get_latent_representation(a)
        _, _, self.latent_deltas = unit_means(
            z, a.obs, self.perturbation_key, self.control_group, self.context_keys, self.delimiter
        )
        return self

    def predict(
        self,
        adata_ctrl,
        perturbation: str,
        context: str = "",
        rule: str = "mean",
        output: str = "sample",
        seed: int = 0,
    ) -> np.ndarray:
        import torch

        p = canonical_perturbation(perturbation, self.control_group, self.delimiter)
        parts = split_perturbation(p, self.control_group, self.delimiter)
        shift = shift_by_rule(self.latent_deltas, p, context, parts, rule, self.delimiter)
        a = adata_ctrl.copy()
        a.obs = a.obs[[]]
        self.model.setup_anndata(a, layer=self.layer)
        z = self.model.get_latent_representation(a) + shift[None, :]
        counts = a.X if self.layer is None else a.layers[self.layer]
        lib = np.asarray(counts.sum(1)).reshape(-1, 1)
        module = self.model.module
        module.eval()
        with torch.no_grad():
            zt = torch.as_tensor(z, dtype=torch.float32, device=module.device)
            libt = torch.log(torch.as_tensor(lib, dtype=torch.float32, device=module.device))
            batch = torch.zeros(len(z), 1, dtype=torch.long, device=module.device)
            px = module.generative(z=zt, library=libt, batch_index=batch)["px"]
            if output == "mean":
                x = px.mean
            elif output == "sample":
                g = torch.Generator(device="cpu").manual_seed(seed)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
                    x = px.sample()
            else:
                raise ValueError(f"output={output!r}; choose 'sample' or 'mean'.")
        return lognorm(x.cpu().numpy())

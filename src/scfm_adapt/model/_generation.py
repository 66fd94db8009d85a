"""Generation methods of :class:`~scfm_adapt.model.SCFM`: conditional sampling of new cells
with classifier-free guidance, and counterfactual transfer of real cells by DDIM inversion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from .._slots import SLOTS
from ..errors import UnknownCategoryError
from ..module import MODULE_KEYS, SCFMModule
from ._results import cells_anndata
from .base import seeded


@dataclass(frozen=True)
class Condition:
    """One registered covariate as the user names it (its ``obs`` key)."""

    key: str  # obs column
    name: str  # the module's name: batch, labels, cat_cov_i, continuous
    categories: tuple | None  # None for continuous
    column: int = 0  # position among the continuous covariates

    @property
    def categorical(self) -> bool:
        return self.categories is not None

    def column_of(self, values: np.ndarray) -> pd.Categorical | np.ndarray:
        """``values`` as an ``obs`` column: categorical with the model's categories, or
        float32."""
        if self.categorical:
            cats = [str(c) for c in self.categories]
            return pd.Categorical(np.asarray(values).astype(str), categories=cats)
        return np.asarray(values, dtype=np.float32)


def _batches_of(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class GenerationMixin:
    """Mixed into :class:`~scfm_adapt.model.SCFM`; see :meth:`generate`."""

    # What this mixin needs from the model it is mixed into, beyond BaseModel:
    module: SCFMModule
    trained_stages_: list[str]

    # ------------------------------------------------------------------ hooks
    def _generate_extra(self, z: torch.Tensor, conds: dict) -> dict[str, tuple]:
        """Counts and means of further modalities for generated tokens ``z``: none for an
        RNA model (a MuData model overrides this, see ``MultimodalMixin``)."""
        return {}

    def _generated_mudata(self, rna: AnnData, extra: dict):
        """Generated RNA joined with the further modalities of :meth:`_generate_extra`:
        an RNA model has none, and returns the RNA itself."""
        return rna

    # ------------------------------------------------------------------ conditions
    @property
    def conditions_(self) -> dict[str, Condition]:
        """The covariates the model is conditioned on, keyed by their ``obs`` column."""
        args = self.registry_["setup_args"]
        out: dict[str, Condition] = {}

        fields = self.registry_["field_registries"]  # present with or without an AnnData

        def state(key):
            return fields[key]["state_registry"]

        def mapping(key):
            return tuple(state(key)["categorical_mapping"])

        if args.get("batch_key") is not None:
            out[args["batch_key"]] = Condition(
                args["batch_key"], "batch", mapping(REGISTRY_KEYS.BATCH_KEY)
            )
        if args.get("labels_key") is not None:
            out[args["labels_key"]] = Condition(
                args["labels_key"], "labels", mapping(REGISTRY_KEYS.LABELS_KEY)
            )
        cat_keys = args.get("categorical_covariate_keys") or []
        if cat_keys:
            maps = state(REGISTRY_KEYS.CAT_COVS_KEY)["mappings"]
            for i, key in enumerate(cat_keys):
                out[key] = Condition(key, f"cat_cov_{i}", tuple(maps[key]))
        for j, key in enumerate(args.get("continuous_covariate_keys") or []):
            out[key] = Condition(key, "continuous", None, j)
        return out

    def _condition_frame(
        self,
        conditions: pd.DataFrame | Mapping[str, Any] | None,
        n_samples: int | None,
        fill_conditions: bool,
        rng: np.random.Generator,
    ) -> pd.DataFrame:
        """Validated conditions, one row per cell to generate (missing covariates filled
        from the training cells that match the given ones when ``fill_conditions``)."""
        known = self.conditions_
        if conditions is None:
            conditions = {}
        if isinstance(conditions, pd.DataFrame):
            if n_samples is not None and n_samples != len(conditions):
                raise ValueError(
                    f"n_samples={n_samples} but conditions has {len(conditions)} rows: give "
                    "one row per cell, or a dict of values with n_samples."
                )
            frame = conditions.reset_index(drop=True).copy()
        else:
            lengths = {len(v) for v in conditions.values() if _is_list(v)}
            if len(lengths) > 1:
                raise ValueError(f"condition lists have different lengths {sorted(lengths)}.")
            n = n_samples if n_samples is not None else (lengths.pop() if lengths else None)
            if n is None:
                raise ValueError("Say how many cells to generate: n_samples=... .")
            if lengths and n not in lengths:
                raise ValueError(f"n_samples={n} but the condition lists have length {lengths}.")
            frame = pd.DataFrame(
                {k: (list(v) if _is_list(v) else [v] * n) for k, v in conditions.items()},
                index=range(n),
            )
        if len(frame) == 0:
            raise ValueError("Nothing to generate: n_samples is 0 / conditions is empty.")
        unknown = [k for k in frame.columns if k not in known]
        if unknown:
            raise KeyError(
                f"{unknown} are not conditions of the model; it knows {list(known)} "
                "(the keys given to setup_anndata)."
            )
        for key in frame.columns:
            cond = known[key]
            if cond.categorical:
                values = frame[key].astype(str)
                bad = sorted(set(values) - {str(c) for c in cond.categories})
                if bad:
                    raise UnknownCategoryError(
                        f"{key}={bad[:5]} is not a category the model knows; choose among "
                        f"{list(cond.categories)[:20]}."
                    )
                frame[key] = values
            else:
                frame[key] = pd.to_numeric(frame[key], errors="raise").astype(np.float32)
                if not np.isfinite(frame[key]).all():
                    raise ValueError(f"Continuous condition {key!r} holds NaN or inf.")
        missing = [k for k in known if k not in frame.columns]
        if missing and fill_conditions and self.adata is not None:
            frame = self._fill_from_data(frame, missing, rng)
        return frame

    def _fill_from_data(
        self, frame: pd.DataFrame, missing: list[str], rng: np.random.Generator
    ) -> pd.DataFrame:
        """Draw the missing covariates of each row from a random training cell with the
        row's given categorical values."""
        obs = self.adata.obs
        known = self.conditions_
        given = [k for k in frame.columns if known[k].categorical]
        keys = obs[given].astype(str) if given else pd.DataFrame(index=obs.index)
        filled = {k: np.empty(len(frame), dtype=object) for k in missing}
        groups = (
            frame.groupby(given, sort=False, observed=True).indices
            if given
            else {(): np.arange(len(frame))}
        )
        for values, rows in groups.items():
            values = values if isinstance(values, tuple) else (values,)
            match = np.ones(len(obs), dtype=bool)
            for k, v in zip(given, values):
                match &= (keys[k] == v).to_numpy()
            pool = np.flatnonzero(match)
            if len(pool) == 0:
                desc = ", ".join(f"{k}={v!r}" for k, v in zip(given, values))
                raise ValueError(
                    f"No training cell has {desc}, so {missing} cannot be drawn from the data: "
                    "give them explicitly, or pass fill_conditions=False to leave them "
                    "unconditioned."
                )
            pick = pool[rng.integers(0, len(pool), len(rows))]
            for k in missing:
                filled[k][rows] = obs[k].to_numpy()[pick]
        for k in missing:
            values = pd.Series(filled[k])
            frame[k] = values.astype(str) if known[k].categorical else values.astype(np.float32)
        return frame

    def _condition_tensors(self, frame: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Module conditions (codes) for a validated frame; the decoder always gets a
        batch and every categorical covariate."""
        device = self.module.device
        n = len(frame)
        known = self.conditions_
        out: dict[str, torch.Tensor] = {}
        conts = [c for c in known.values() if not c.categorical]
        for key, cond in known.items():
            if not cond.categorical or key not in frame:
                continue
            codes = pd.Categorical(frame[key], categories=[str(c) for c in cond.categories]).codes
            out[cond.name] = torch.as_tensor(np.array(codes), dtype=torch.long, device=device)
        if conts and all(c.key in frame for c in conts):
            values = frame[[c.key for c in conts]].to_numpy(np.float32)
            out["continuous"] = torch.as_tensor(values, device=device)
        decoder_needs = ["batch"] + [f"cat_cov_{i}" for i in range(len(self.module.n_cats_per_cov))]
        sizes = [self.module.n_batch, *self.module.n_cats_per_cov]
        for name, size in zip(decoder_needs, sizes):
            if name in out:
                continue
            if size > 1:
                key = next(c.key for c in known.values() if c.name == name)
                raise ValueError(
                    f"Condition {key!r} is needed to decode counts: give it, or keep "
                    "fill_conditions=True with the training data attached to the model."
                )
            out[name] = torch.zeros(n, dtype=torch.long, device=device)
        return out

    def _guidance_names(self, guidance_scale: float | Mapping[str, float]):
        if not isinstance(guidance_scale, Mapping):
            return _finite(guidance_scale, "guidance_scale")
        known = self.conditions_
        out = {}
        for key, value in guidance_scale.items():
            if key not in known:
                raise KeyError(
                    f"guidance_scale names {key!r}, which is not a condition of the model "
                    f"({list(known)})."
                )
            out[known[key].name] = _finite(value, f"guidance_scale[{key!r}]")
        return out

    def _check_prior(self) -> None:
        if "prior" not in self.trained_stages_:
            raise RuntimeError(
                "Generation samples the DiT prior, which is not trained: call "
                "model.train() (both stages) or model.train(stage='prior') first."
            )

    # ------------------------------------------------------------------ generate
    @torch.inference_mode()
    def generate(
        self,
        conditions: pd.DataFrame | Mapping[str, Any] | None = None,
        n_samples: int | None = None,
        *,
        guidance_scale: float | Mapping[str, float] = 1.0,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        n_steps: int = 50,
        eta: float = 0.0,
        library_size: float | Sequence[float] | np.ndarray | None = None,
        fill_conditions: bool = True,
        seed: int | None = 0,
        batch_size: int = 1024,
        progress: bool | None = None,
    ) -> AnnData:
        """Generate new cells: tokens from the conditional DiT, counts from the decoder.

        Parameters
        ----------
        conditions
            Per-cell conditions as an ``obs``-like DataFrame (one row per cell, columns
            named like the ``setup_anndata`` keys, e.g. ``labels_key``), or a dict of
            values (scalars, or lists of length ``n_samples``).
        n_samples
            Number of cells (with a dict of scalars, or no conditions at all).
        guidance_scale
            Classifier-free guidance: one number for all conditions jointly (1 plain
            conditional sampling, 0 unconditional, above 1 sharper), or a dict per
            covariate key, e.g. ``{"cell_type": 2.0, "batch": 0.0}`` (0 marginalises that
            covariate, 1 keeps it, above 1 amplifies it; unnamed keys stay at 1).
        sampler, n_steps, eta
            ``"ddim"`` (``eta=0`` deterministic given the starting noise) or ``"ddpm"``
            (ancestral), over ``n_steps`` denoising steps.
        library_size
            Total counts per generated cell: ``None`` draws them from the model's library
            model given each cell's tokens and covariates; a number or one per cell fixes
            them.
        fill_conditions
            Covariates not given are drawn, per cell, from a random training cell with
            the given values (so that "B cells" come in the data's mix of batches). With
            ``False`` they are left unconditioned in the prior (a decoder covariate with
            several categories must then be given).
        seed
            Same seed, same cells (for the same arguments). ``None`` uses torch's global
            random state.
        batch_size
            Cells sampled at a time.
        progress
            Progress bar (default: when sampling more than one batch).

        Returns
        -------
        AnnData with sampled counts in ``X`` (sparse float32 holding integers),
        ``layers["scfm_expected"]`` the decoder's mean, ``obs`` the conditions plus
        ``scfm_library``, ``var`` indexed by the model's genes and
        ``uns["scfm_generate"]["params"]``.
        A model set up with :meth:`setup_mudata` returns a MuData of paired cells instead:
        one such AnnData per modality (``X`` counts, ``layers["scfm_expected"]``), all decoded
        from the same generated tokens, with the conditions in ``obs``.

        Raises
        ------
        RuntimeError
            The prior (stage 2) is not trained.
        UnknownCategoryError, KeyError
            Unknown condition values or keys.
        """
        self._check_prior()
        _check_steps(n_steps, eta)
        rng = np.random.default_rng(seed)
        frame = self._condition_frame(conditions, n_samples, fill_conditions, rng)
        n = len(frame)
        lib = _library_array(library_size, n)
        guidance = self._guidance_names(guidance_scale)
        self.module.eval()
        device = self.module.device
        conds_all = self._condition_tensors(frame)
        counts, expected, libs, extra = [], [], [], []
        slices = list(_batches_of(n, batch_size))
        show = progress if progress is not None else len(slices) > 1
        it = slices
        if show:
            from tqdm.auto import tqdm

            it = tqdm(slices, desc="generating", unit="batch")
        with seeded(seed, device):
            for sl in it:
                conds = {k: v[sl] for k, v in conds_all.items()}
                m = sl.stop - sl.start
                z = self.module.sample_tokens(
                    m,
                    conds,
                    guidance,
                    n_steps=n_steps,
                    eta=eta,
                    sampler=sampler,
                    progress=bool(show) and len(slices) == 1,
                )
                if lib is None:
                    library = self.module.sample_library(z, conds)
                else:
                    library = torch.as_tensor(lib[sl], device=device).view(-1, 1)
                px = self.module.decode(z, library, conds)
                counts.append(px.sample().float().cpu().numpy())
                expected.append(px.mean.float().cpu().numpy())
                libs.append(library.view(-1).float().cpu().numpy())
                extra.append(self._generate_extra(z, conds))
        obs = self._obs_of(frame)
        obs[SLOTS.library] = np.concatenate(libs)
        obs.index = [f"scfm_gen_{i}" for i in range(n)]
        params = {
            "guidance_scale": _guidance_param(guidance_scale),
            "sampler": sampler,
            "n_steps": n_steps,
            "eta": eta,
            "seed": seed,
            "fill_conditions": fill_conditions,
            "library_size": "model" if lib is None else "given",
        }
        adata = self._as_anndata(np.concatenate(counts), np.concatenate(expected), obs, params)
        joined = {
            m: tuple(np.concatenate([e[m][i] for e in extra]) for i in range(2)) for m in extra[0]
        }
        return self._generated_mudata(adata, joined)

    def _obs_of(self, frame: pd.DataFrame) -> pd.DataFrame:
        obs = pd.DataFrame(index=range(len(frame)))
        for key, cond in self.conditions_.items():
            if key in frame:
                obs[key] = cond.column_of(frame[key].to_numpy())
        return obs

    def _as_anndata(
        self,
        counts: np.ndarray,
        expected: np.ndarray,
        obs: pd.DataFrame,
        params: dict,
        key: str = SLOTS.generate,
    ) -> AnnData:
        return cells_anndata(counts, expected, obs, self.var_names_, {key: {"params": params}})

    # ------------------------------------------------------------------ counterfactuals
    def _target_codes(self, target: Mapping[str, Any]) -> dict[str, Any]:
        """Module-name → code (categorical) or (column, value) (continuous)."""
        known = self.conditions_
        if not target:
            raise ValueError(
                "target is empty: say which covariate to change, e.g. {'batch': 'b2'}."
            )
        out: dict[str, Any] = {}
        for key, value in target.items():
            if key not in known:
                raise KeyError(f"{key!r} is not a condition of the model ({list(known)}).")
            cond = known[key]
            if cond.categorical:
                cats = [str(c) for c in cond.categories]
                if str(value) not in cats:
                    raise UnknownCategoryError(
                        f"{key}={value!r} is not a category the model knows ({cats[:20]})."
                    )
                out[cond.name] = cats.index(str(value))
            else:
                out.setdefault("continuous", {})[cond.column] = float(value)
        return out

    def _counterfactual_batch(
        self,
        tensors: dict[str, torch.Tensor],
        codes: dict[str, Any],
        n_steps: int,
        strength: float,
        guidance: float | dict,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Invert one minibatch's posterior-mean tokens under their own conditions and
        regenerate them under the target: ``(z_new, observed library, target conditions)``."""
        module = self.module
        inf = module.inference(**module._get_inference_input(tensors))
        source = module.conditions(tensors)
        new = dict(source)
        for name, code in codes.items():
            if name == "continuous":
                cont = source["continuous"].clone()
                for col, value in code.items():
                    cont[:, col] = value
                new["continuous"] = cont
            else:
                new[name] = torch.full_like(source[name], code)
        z0 = inf[MODULE_KEYS.QZ].loc
        x_T = module.invert_tokens(z0, source, n_steps=n_steps, strength=strength)
        z = module.sample_tokens(
            z0.shape[0], new, guidance, n_steps=n_steps, x_T=x_T, strength=strength
        )
        return z, inf[MODULE_KEYS.LIBRARY], new

    @torch.inference_mode()
    def counterfactual(
        self,
        adata: AnnData | None = None,
        target: Mapping[str, Any] | None = None,
        *,
        indices: Sequence[int] | None = None,
        n_steps: int = 50,
        strength: float = 0.9,
        guidance_scale: float | Mapping[str, float] = 1.0,
        library_size: Literal["observed", "model"] = "observed",
        seed: int | None = 0,
        batch_size: int | None = None,
    ) -> AnnData:
        """What each cell would look like under other conditions (e.g. another batch).

        The cell's posterior-mean tokens are DDIM-inverted under its own conditions
        (deterministic, no guidance), then regenerated from that noise by DDIM under the
        conditions with ``target`` substituted, and decoded with the target covariates.
        Inverting and regenerating under the *same* conditions gives the tokens back up
        to the discretisation error (tested).

        Parameters
        ----------
        adata
            Cells to transfer (defaults to the training data); registered like it.
        target
            Covariate key → new value for every cell, e.g. ``{"batch": "b2"}``.
        n_steps
            DDIM steps of both the inversion and the regeneration.
        strength
            Fraction of the diffusion run, from 0 (no change) to 1 (through pure noise).
            The default 0.9 avoids the last, near-degenerate steps of the cosine schedule,
            where inversion errors are amplified.
        guidance_scale
            Guidance of the regeneration (see :meth:`generate`).
        library_size
            ``"observed"`` keeps each cell's library; ``"model"`` draws it from the library
            model under the target covariates.
        seed
            Seeds the count sampling and any library draws.

        Returns
        -------
        AnnData like ``adata`` (same ``obs_names`` and ``obs``, targets replaced; the old
        values in ``obs["scfm_source_<key>"]``): sampled counts in ``X``,
        ``layers["scfm_expected"]``.
        """
        self._check_prior()
        if library_size not in ("observed", "model"):
            raise ValueError("library_size must be 'observed' or 'model'.")
        codes = self._target_codes(target or {})
        guidance = self._guidance_names(guidance_scale)
        _check_steps(n_steps, 0.0)
        if not 0.0 < _finite(strength, "strength") <= 1.0:
            raise ValueError(f"strength must be in (0, 1] (0.9 by default), got {strength!r}.")
        adata_ = self.adata if adata is None else adata
        self.module.eval()
        device = self.module.device
        counts, expected = [], []
        with seeded(seed, device):
            for tensors in self._batches(adata_, indices, batch_size):
                z, library, new = self._counterfactual_batch(
                    tensors, codes, n_steps, strength, guidance
                )
                if library_size == "model":
                    library = self.module.sample_library(z, new)
                px = self.module.decode(z, library, new)
                counts.append(px.sample().float().cpu().numpy())
                expected.append(px.mean.float().cpu().numpy())
        sel = slice(None) if indices is None else np.asarray(indices)
        obs = adata_.obs.iloc[sel].copy()
        known = self.conditions_
        for key, value in (target or {}).items():
            obs[f"{SLOTS.source}_{key}"] = obs[key].to_numpy()
            obs[key] = known[key].column_of(np.repeat(np.asarray([value], dtype=object), len(obs)))
        params = {
            "target": {
                k: (v if isinstance(v, (int, float)) else str(v)) for k, v in target.items()
            },
            "n_steps": n_steps,
            "strength": strength,
            "guidance_scale": _guidance_param(guidance_scale),
            "library_size": library_size,
            "seed": seed,
        }
        return self._as_anndata(
            np.concatenate(counts), np.concatenate(expected), obs, params, SLOTS.counterfactual
        )


def _guidance_param(guidance_scale) -> float | dict:
    """``guidance_scale`` as stored in ``uns[...]["params"]``."""
    if isinstance(guidance_scale, Mapping):
        return dict(guidance_scale)
    return float(guidance_scale)


def _is_list(v) -> bool:
    return isinstance(v, (list, tuple, np.ndarray, pd.Series, pd.Index, pd.Categorical))


def _finite(value, name: str) -> float:
    """``value`` as a finite float, or a ValueError naming the argument."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if not np.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return out


def _check_steps(n_steps, eta) -> None:
    """The sampler's step count and DDIM ``eta``, with errors that name the fix."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer (e.g. 50), got {n_steps!r}.")
    if not 0.0 <= _finite(eta, "eta") <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM), got {eta!r}.")


def _library_array(library_size, n: int) -> np.ndarray | None:
    if library_size is None:
        return None
    lib = np.asarray(library_size, dtype=np.float32)
    if lib.ndim == 0:
        lib = np.full(n, float(lib), dtype=np.float32)
    if lib.shape != (n,) or not np.isfinite(lib).all() or (lib <= 0).any():
        raise ValueError(
            f"library_size must be a positive number or {n} positive numbers (one per cell)."
        )
    return lib

"""MuData support of :class:`~scfm_adapt.model.SCFM`: RNA plus protein and/or ATAC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data.fields import (
    MuDataCategoricalJointObsField,
    MuDataCategoricalObsField,
    MuDataLayerField,
    MuDataNumericalJointObsField,
    MuDataProteinLayerField,
)

from ..data import check_counts, check_obs_keys, get_matrix
from ..errors import GeneMismatchError, ModalityError
from ..module import MODULE_KEYS, MultimodalSCFMModule, SCFMModule
from ..module._multimodal import MODALITY_KEYS, MODALITY_LIKELIHOODS, MODALITY_TOKENS
from ._results import modalities_mudata
from .base._inputs import setup_obs_keys

ROLES = ("rna", "protein", "atac")
#: SCFM arguments that only a MuData model takes.
MULTIMODAL_KWARGS = ("protein_likelihood", "atac_likelihood", "modality_tokens")


def is_mudata(data) -> bool:
    """Whether ``data`` is a :class:`mudata.MuData`."""
    from mudata import MuData

    return isinstance(data, MuData)


def _check_modalities(mdata, modalities: dict[str, str]) -> None:
    if not isinstance(modalities, dict) or "rna" not in modalities:
        raise ModalityError(
            "modalities must map 'rna' (and optionally 'protein', 'atac') to modality names "
            f"of the MuData, e.g. {{'rna': 'rna', 'protein': 'prot'}}; got {modalities!r}."
        )
    unknown = set(modalities) - set(ROLES)
    if unknown:
        raise ModalityError(
            f"Unknown modality roles {sorted(unknown)}; the model reads {list(ROLES)}."
        )
    for role, name in modalities.items():
        if name not in mdata.mod:
            raise ModalityError(
                f"modalities[{role!r}] = {name!r} is not a modality of the MuData (it has "
                f"{list(mdata.mod)}). Name one of those, or add the modality first."
            )
    obs_names = pd.Index(mdata.obs_names)
    if not obs_names.is_unique:
        raise ValueError("mdata.obs_names has duplicates; call mdata.obs_names_make_unique().")
    for name in modalities.values():
        mod = mdata.mod[name]
        if mod.n_obs != len(obs_names) or set(mod.obs_names) != set(obs_names):
            raise ModalityError(
                f"Modality {name!r} has {mod.n_obs} cells but the MuData has {len(obs_names)}: "
                "the modalities cover different cells. Pair them with "
                "`mdata = scfm_adapt.data.pair_modalities(mdata)`, which gives cells lacking "
                "a modality all-zero rows that the model masks (or keep the shared cells with "
                "`muon.pp.intersect_obs(mdata)`)."
            )
        if not (mod.obs_names == obs_names).all():
            raise ModalityError(
                f"Modality {name!r} holds the MuData's cells in another order. Reorder it: "
                f"`mdata.mod[{name!r}] = mdata.mod[{name!r}][mdata.obs_names].copy(); "
                "mdata.update()`."
            )
        if not mod.var_names.is_unique:
            raise ValueError(
                f"mdata.mod[{name!r}].var_names has duplicates; call var_names_make_unique()."
            )


class MultimodalMixin:
    """``setup_mudata`` and the modality-aware parts of :class:`SCFM`."""

    # What this mixin needs from the model it is mixed into, beyond BaseModel:
    module: SCFMModule
    #: Feature names of each further modality (role -> names), set by the model.
    modality_var_names_: dict[str, list[str]]

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        *,
        modalities: dict[str, str],
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        atac_layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register a MuData's modalities and covariates with the model class.

        Each modality gets its own tokenizer and likelihood (NB/ZINB/Poisson for RNA, a
        background-plus-foreground NB mixture or an NB for protein, Poisson for ATAC; see
        :class:`~scfm_adapt.module.MultimodalSCFMModule`), and the tokens join into one
        sequence. A cell whose counts of a modality are all zero lacks it: that modality is
        masked for the cell. Cells measured in some modalities only are paired first with
        :func:`scfm_adapt.data.pair_modalities`. Proteins one batch's panel did not measure
        (all zero in the batch) are left out of that batch's likelihood, as in totalVI.

        Parameters
        ----------
        mdata
            MuData with raw counts in each modality (all modalities over the same cells).
        modalities
            Role → modality name: ``{"rna": ..., "protein": ..., "atac": ...}``; ``"rna"`` is
            required, the others optional.
        rna_layer, protein_layer, atac_layer
            Layer of each modality holding the counts (``None``: its ``X``).
        batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys
            Columns of ``mdata.obs``, as in :meth:`setup_anndata`.

        Raises
        ------
        ModalityError
            A named modality is missing, or the modalities cover different cells.
        InvalidCountsError
            A modality holds non-integer, negative or non-finite values.
        KeyError
            A named layer or ``obs`` column does not exist.
        """
        if not is_mudata(mdata):
            raise TypeError(
                f"setup_mudata needs a mudata.MuData, got {type(mdata).__name__}; register an "
                "AnnData with SCFM.setup_anndata."
            )
        setup_method_args = cls._get_setup_method_args(**locals())
        _check_modalities(mdata, modalities)
        check_obs_keys(
            mdata.obs,
            [
                batch_key,
                labels_key,
                *(categorical_covariate_keys or []),
                *(continuous_covariate_keys or []),
            ],
            "mdata.obs",
            "Covariates of a MuData model are read from mdata.obs (modality columns appear "
            "there as 'mod:column').",
        )
        layers = {"rna": rna_layer, "protein": protein_layer, "atac": atac_layer}
        for role, name in modalities.items():
            mod = mdata.mod[name]
            where = f"mdata.mod[{name!r}]." + (f"layers[{layers[role]!r}]" if layers[role] else "X")
            check_counts(get_matrix(mod, layers[role]), where)
        batch_field = MuDataCategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=None)
        fields = [
            MuDataLayerField(
                REGISTRY_KEYS.X_KEY,
                rna_layer,
                mod_key=modalities["rna"],
                is_count_data=True,
                mod_required=True,
            ),
            batch_field,
            MuDataCategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, mod_key=None),
            MuDataCategoricalJointObsField(
                REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys, mod_key=None
            ),
            MuDataNumericalJointObsField(
                REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys, mod_key=None
            ),
        ]
        if "protein" in modalities:
            fields.append(
                MuDataProteinLayerField(
                    MODALITY_KEYS["protein"],
                    protein_layer,
                    mod_key=modalities["protein"],
                    use_batch_mask=True,
                    batch_field=batch_field,
                    is_count_data=True,
                    mod_required=True,
                )
            )
        if "atac" in modalities:
            fields.append(
                MuDataLayerField(
                    MODALITY_KEYS["atac"],
                    atac_layer,
                    mod_key=modalities["atac"],
                    is_count_data=True,
                    mod_required=True,
                )
            )
        cls._register(mdata, fields, setup_method_args, **kwargs)

    # ------------------------------------------------------------------ registry
    @property
    def is_multimodal(self) -> bool:
        """Whether the model was set up on a MuData (:meth:`setup_mudata`)."""
        return self.registry_.get("setup_method_name") == "setup_mudata"

    @property
    def modalities_(self) -> dict[str, str]:
        """Role → modality name of the MuData the model was set up with."""
        if not self.is_multimodal:
            return {"rna": "rna"}
        return dict(self.registry_["setup_args"]["modalities"])

    def _layer_of(self, role: str) -> str | None:
        args = self.registry_["setup_args"]
        return args.get(f"{role}_layer") if self.is_multimodal else args.get("layer")

    def _counts_matrix(self, data):
        """The RNA counts matrix of an AnnData, or of a registered MuData's RNA modality."""
        if self.is_multimodal:
            return get_matrix(data.mod[self.modalities_["rna"]], self._layer_of("rna"))
        return super()._counts_matrix(data)

    def _model_input(self, data):
        """What scvi-tools registers for foreign data: a MuData model takes a MuData with
        its modalities (an AnnData is taken as RNA alone, the others masked); an AnnData
        model takes an input shell of an AnnData."""
        if not self.is_multimodal:
            if is_mudata(data):
                raise TypeError(
                    "This model was set up on an AnnData; pass an AnnData (e.g. "
                    "mdata.mod['rna']), or set up a MuData model with SCFM.setup_mudata."
                )
            return super()._model_input(data)
        mdata = self._as_model_mudata(data)
        if mdata is not self.adata and not self._checked(mdata):
            self._check_mudata_input(mdata)
        return mdata

    def _modality_var_names(self, mdata) -> dict[str, list[str]]:
        return {
            role: [str(v) for v in mdata.mod[name].var_names]
            for role, name in self.modalities_.items()
            if role != "rna"
        }

    def _multimodal_module_kwargs(self, kwargs: dict) -> tuple[type, dict]:
        """The module class and its arguments for this registry."""
        kwargs = dict(kwargs)
        extra = {k: kwargs.pop(k, None) for k in MULTIMODAL_KWARGS}
        if not self.is_multimodal:
            given = [k for k, v in extra.items() if v is not None]
            if given:
                raise TypeError(
                    f"{given} apply to a model set up on a MuData (SCFM.setup_mudata); this "
                    "one was set up on an AnnData."
                )
            return None, kwargs
        tokens = dict(extra["modality_tokens"] or {})
        stats = self.summary_stats
        n_features = {"protein": stats.get("n_proteins"), "atac": stats.get("n_atac")}
        specs = {}
        for role in self.modalities_:
            if role == "rna":
                continue
            specs[role] = {
                "n_features": int(n_features[role]),
                "n_tokens": int(tokens.get(role, MODALITY_TOKENS[role])),
                "likelihood": extra[f"{role}_likelihood"] or MODALITY_LIKELIHOODS[role][0],
            }
        kwargs["modalities"] = specs
        return MultimodalSCFMModule, kwargs

    def _set_protein_mask(self, module) -> None:
        """Copy scvi-tools' per-batch protein panel mask into the module."""
        if "protein" not in getattr(module, "mod_specs", {}):
            return
        state = self.registry_["field_registries"][MODALITY_KEYS["protein"]]["state_registry"]
        masks = state.get("protein_batch_mask")
        if not masks:
            return
        mask = module.protein_mask.clone()
        for code, row in masks.items():
            if int(code) < mask.shape[0]:
                mask[int(code)] = torch.as_tensor(np.asarray(row, dtype=bool))
        module.protein_mask.copy_(mask)

    @torch.no_grad()
    def _fit_modality_init(self) -> None:
        """Start the extra modalities' heads at the data's scale (fresh models only)."""
        module = self.module
        for role, spec in getattr(module, "mod_specs", {}).items():
            mod = self.adata.mod[self.modalities_[role]]
            y = get_matrix(mod, self._layer_of(role))
            head = module.decoder.mod_heads[role].bias.view(spec["n_features"], -1)
            if spec["likelihood"] == "poisson":  # only the libraries: the matrix stays sparse
                lib = np.asarray(y.sum(1), dtype=np.float64).ravel()
                log_lib = np.log(lib[lib > 0])
                bias = module.decoder.mod_lib_out[role].bias
                bias[0] = float(log_lib.mean())
                bias[1] = float(np.log(np.expm1(max(log_lib.std(), 1e-2))))
                continue
            y = np.asarray(y.toarray() if hasattr(y, "toarray") else y, dtype=np.float64)
            batches = self.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY).ravel()
            measured = module.protein_mask[torch.as_tensor(batches).long()].numpy()
            present = y.sum(1) > 0
            lo, hi = [], []
            for j in range(y.shape[1]):
                v = y[present & measured[:, j], j]
                v = v if v.size else np.zeros(1)
                lo.append(np.quantile(v, 0.1))
                hi.append(np.quantile(v, 0.9))
            lo, hi = np.asarray(lo), np.asarray(hi)
            if spec["likelihood"] == "mixture":
                ratio = np.maximum((hi + 1) / (lo + 1) - 1, 0.1)
                head[:, 0] = torch.as_tensor(np.log(lo + 1), dtype=head.dtype)
                head[:, 1] = torch.as_tensor(np.log(np.expm1(ratio)), dtype=head.dtype)
                head[:, 2] = 0.0
            else:
                head[:, 0] = torch.as_tensor(np.log((lo + hi) / 2 + 1), dtype=head.dtype)

    # ------------------------------------------------------------------ data
    def _as_model_mudata(self, adata):
        """A MuData for this multimodal model from ``adata``.

        An AnnData is taken as the RNA modality alone: the other modalities are all-zero,
        so the model masks them (cross-modal prediction from RNA). A MuData must have the
        model's modalities.
        """
        from anndata import AnnData
        from mudata import MuData
        from scipy import sparse

        if is_mudata(adata):
            missing = [n for n in self.modalities_.values() if n not in adata.mod]
            if missing:
                raise ModalityError(
                    f"The MuData lacks the model's modalities {missing} (it has "
                    f"{list(adata.mod)}). Pass an AnnData of RNA alone to predict the "
                    "others from it, or add them as all-zero modalities (masked)."
                )
            return adata
        if not isinstance(adata, AnnData):
            raise TypeError(f"Expected an AnnData or a MuData, got {type(adata).__name__}.")
        x = get_matrix(adata, self._layer_of("rna"))
        rna = AnnData(X=x, obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
        mods = {self.modalities_["rna"]: rna}
        for role, names in self.modality_var_names_.items():
            mods[self.modalities_[role]] = AnnData(
                X=sparse.csr_matrix((adata.n_obs, len(names)), dtype=np.float32),
                obs=pd.DataFrame(index=adata.obs_names),
                var=pd.DataFrame(index=pd.Index(names)),
            )
        layer = self._layer_of("rna")
        if layer is not None:
            rna.layers[layer] = rna.X
        mdata = MuData(mods)
        keys = setup_obs_keys(self.registry_["setup_args"])
        check_obs_keys(adata.obs, keys, hint="The model was set up with it.")
        for key in keys:
            mdata.obs[key] = adata.obs[key].to_numpy()
        return mdata

    def _check_mudata_input(self, mdata) -> None:
        """Genes and counts of every modality of a MuData given to a trained model."""
        from ..data import check_genes

        _check_modalities(mdata, self.modalities_)
        for role, name in self.modalities_.items():
            mod = mdata.mod[name]
            ref = self.var_names_ if role == "rna" else self.modality_var_names_[role]
            try:
                check_genes(mod.var_names, ref)
            except GeneMismatchError as e:
                raise GeneMismatchError(f"Modality {name!r}: {e}") from None
            layer = self._layer_of(role)
            where = f"mdata.mod[{name!r}]." + (f"layers[{layer!r}]" if layer else "X")
            check_counts(get_matrix(mod, layer), where)

    # ------------------------------------------------------------------ outputs
    def _feature_names(self, modality: str) -> list[str]:
        if modality == "rna":
            return list(self.var_names_)
        if modality not in self.modality_var_names_:
            raise ValueError(f"modality={modality!r}; this model has {list(self.modalities_)}.")
        return list(self.modality_var_names_[modality])

    @torch.inference_mode()
    def _modality_expression(
        self,
        adata,
        indices: Sequence[int] | None,
        modality: str,
        given: Sequence[str] | None,
        transform_batch: str | None,
        library_size: float | Literal["latent"],
        n_samples: int,
        batch_size: int | None,
        protein_background: bool,
    ) -> np.ndarray:
        code = self._batch_code(transform_batch)
        self.module.eval()
        out = []
        for tensors in self._batches(adata, indices, batch_size):
            inf = self.module.inference(
                **self.module._get_inference_input(tensors), n_samples=n_samples, given=given
            )
            z = inf[MODULE_KEYS.QZ].loc if n_samples == 1 else inf[MODULE_KEYS.Z]
            conds = self.module.conditions(tensors)
            tb = (
                None
                if code is None
                else torch.full_like(tensors[REGISTRY_KEYS.BATCH_KEY].view(-1), code)
            )
            if modality == "rna":
                lib = inf[MODULE_KEYS.LIBRARY]
                if library_size != "latent":
                    lib = torch.full_like(lib, float(library_size))
                mean = self.module.decode(z, lib, conds, transform_batch=tb).mean
            else:
                libs = {}
                for m, lib in inf["libraries"].items():
                    libs[m] = (
                        lib
                        if library_size == "latent"
                        else torch.full_like(lib, float(library_size))
                    )
                px = self.module.decode_modalities(z, libs, conds, transform_batch=tb)[modality]
                if self.module.mod_specs[modality]["likelihood"] == "mixture":
                    fore = (1 - px.mixture_probs) * px.mu2
                    mean = px.mean if protein_background else fore
                else:
                    mean = px.mean
            mean = mean if n_samples == 1 else mean.mean(0)
            out.append(mean.float().cpu().numpy())
        return np.concatenate(out)

    def _generate_extra(self, z: torch.Tensor, conds: dict) -> dict[str, tuple]:
        """Counts and means of the extra modalities for generated tokens ``z``."""
        if not self.is_multimodal:
            return {}
        libs = self.module.sample_libraries(z, conds)
        dists = self.module.decode_modalities(z, libs, conds)
        return {
            m: (d.sample().float().cpu().numpy(), d.mean.float().cpu().numpy())
            for m, d in dists.items()
        }

    def _generated_mudata(self, rna, extra: dict[str, tuple[np.ndarray, np.ndarray]]):
        """Join generated RNA (an AnnData) and the extra modalities into a MuData (an
        AnnData model's generated cells stay an AnnData)."""
        if not self.is_multimodal:
            return rna
        return modalities_mudata(rna, extra, self.modalities_, self.modality_var_names_)

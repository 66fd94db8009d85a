"""``CellAnnotator``: cell-type annotation on an adapted pretrained SCFM."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data.fields import LabelsWithUnlabeledObsField, LayerField

from ..data import (
    BATCH_GENE_MASKS,
    OBSERVED_KEY,
    check_genes,
    check_layer_counts,
    check_not_view,
    read_batch_gene_masks,
)
from ..errors import MissingKeyError, SCFMInputError, UnknownCategoryError
from ..metrics import expected_calibration_error
from ..module import AnnotatorModule, SCFMModule
from ..train import DEFAULT_GRADIENT_CLIP, fit_temperature
from ._attributions import pathway_attributions
from ._scfm import SCFM
from .base import BaseModel

logger = logging.getLogger(__name__)

#: LoRA targets of the annotator: attention and MLP projections plus the gene projection.
ANNOTATOR_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "gene_to_tokens")


def _annotator_targets(encoder) -> tuple[str, ...]:
    """:data:`ANNOTATOR_LORA_TARGETS` for the latent encoder; other encoders name their own
    transformer targets (an external BERT's differ), plus the gene projection if any (both
    factors where it is factorised)."""
    own = getattr(encoder, "lora_targets", None)
    genes = ("gene_to_tokens",) if hasattr(encoder, "gene_to_tokens") else ()
    if getattr(encoder, "gene_down", None) is not None:
        genes = ("gene_down", *genes)
    if own is None or tuple(own) == ANNOTATOR_LORA_TARGETS[:4]:
        return (*ANNOTATOR_LORA_TARGETS[:4], *genes) if genes else tuple(own)
    return tuple(own) + genes


class CellAnnotator(BaseModel):
    """Cell-type annotation by adapting a pretrained :class:`SCFM`.

    A copy of the pretrained model's encoder is adapted with ``strategy`` (only the
    adapter and a classification head train; the pretrained model itself is not
    modified) and read out by a head on its last hidden states. After training, the
    probabilities are calibrated by temperature scaling on the validation cells, and an
    out-of-distribution (OOD) score, the Mahalanobis distance of a cell's features to the
    nearest class mean, is fitted so that cells of none of the known types are flagged
    rather than forced into a class.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`, with the pretrained model's genes
        (for data with other genes, :func:`~scfm_adapt.data.align_genes` first: the genes
        it lacks, ``var["scfm_observed"] == False``, are then masked, not read as zeros).
    pretrained
        A trained :class:`SCFM`, or the folder it was saved to.
    strategy
        ``"linear_probe"``, ``"lora"`` (default), ``"adapter"``, ``"partial"`` or ``"full"``
        (see :meth:`SCFM.adapt`).
    head
        ``"linear"`` or ``"mlp"``.
    class_weight
        ``None`` or ``"balanced"`` (inverse class frequency in the cross-entropy, which
        helps rare types and macro-F1).
    adapter_name
        Name of the adapter added to the copy of the backbone.
    **adapt_kwargs
        ``rank``, ``alpha``, ``target_modules``, ``bottleneck``, ``n_blocks`` ... of
        :meth:`SCFM.adapt`; ``parts`` defaults to ``("encoder",)`` and LoRA's
        ``target_modules`` to the attention and MLP projections plus the encoder's
        gene → token projection (``gene_to_tokens``).

    Examples
    --------
    >>> sfa.model.CellAnnotator.setup_anndata(adata, labels_key="cell_type")
    >>> annotator = sfa.model.CellAnnotator(adata, pretrained=model, strategy="lora")
    >>> annotator.train(max_epochs=30)
    >>> sfa.tl.annotate(query, annotator)  # obs["scfm_label"], obs["scfm_label_confidence"]
    """

    _module_cls = AnnotatorModule
    # An annotator reads the genes of its pretrained model in their order (no reordering),
    # and ignores obs: every cell it is given is unlabelled (see _shell_obs).
    _reorders_genes = False
    _genes_owner = "annotator"
    _unknown_category_fix = (
        "relabel those cells to one of the annotator's types or to its unlabeled category "
        "(annotator.classes_, annotator.unlabeled_category_)"
    )

    def __init__(
        self,
        adata: AnnData | None = None,
        pretrained: SCFM | str | Path | None = None,
        strategy: str = "lora",
        *,
        head: str = "linear",
        dropout: float = 0.1,
        class_weight: str | None = None,
        adapter_name: str = "annotation",
        registry: dict | None = None,
        _backbone: SCFMModule | None = None,
        **adapt_kwargs,
    ):
        super().__init__(adata, registry=registry)
        if _backbone is None:
            if pretrained is None:
                raise ValueError("Give the pretrained SCFM (a model or a folder) to adapt.")
            pretrained = SCFM.trained_model(pretrained, "pretrained")
            check_genes(adata.var_names, pretrained.var_names_, what="pretrained model")
            panels = adata.uns.get(BATCH_GENE_MASKS)
            if panels and read_batch_gene_masks(adata, panels["batch_key"]):
                raise SCFMInputError(
                    "These cells come from files that measure different genes "
                    f"(uns[{BATCH_GENE_MASKS!r}]); an annotator reads one gene panel for all "
                    "its cells. Annotate one file's cells at a time: "
                    "sfa.data.select_panel(adata, batch) gives them with their panel."
                )
            backbone = copy.deepcopy(pretrained.module).cpu()
            if adapter_name in backbone.adapter_specs:
                raise ValueError(
                    f"The pretrained model already has an adapter {adapter_name!r}; "
                    "pass another adapter_name."
                )
            adapt_kwargs.setdefault("parts", ("encoder",))
            if strategy == "lora":
                # The gene → token projection is where a new protocol or tissue differs
                # most: across protocols LoRA on the transformer alone fails where LoRA with
                # this layer works (benchmarks/README.md, annotation on CellBench).
                adapt_kwargs.setdefault("target_modules", _annotator_targets(backbone.encoder))
            if strategy in ("lora", "adapter"):
                # Weights that play that part but are not linear layers LoRA could wrap (a
                # pathway encoder's gene → pathway weights) train in place, as part of the
                # adapter (benchmarks/README.md, "pathway_tokens.py").
                own = getattr(backbone.encoder, "annotator_trainable", ())
                adapt_kwargs.setdefault("train_params", tuple(f"encoder.{p}" for p in own))
            backbone.add_adapter(adapter_name, strategy, **adapt_kwargs)
            if OBSERVED_KEY in adata.var:  # aligned to the pretrained genes (align_genes):
                # the genes this data set lacks are unobserved, not zero counts
                observed = np.asarray(adata.var[OBSERVED_KEY].to_numpy(), dtype=bool)
                backbone.set_gene_mask(torch.as_tensor(observed) & backbone.gene_mask.cpu())
            self.var_names_ = list(pretrained.var_names_)
        else:
            backbone = _backbone
            self.var_names_ = [str(g) for g in adata.var_names] if adata is not None else []
        mapping = self._label_mapping()
        self.classes_ = [str(c) for c in mapping[:-1]]
        if not self.classes_:
            raise ValueError("No labelled cells: every cell has the unlabeled category.")
        weights = None
        if class_weight == "balanced" and adata is not None:
            codes = self.get_from_registry(adata, REGISTRY_KEYS.LABELS_KEY).ravel()
            counts = np.bincount(codes[codes < len(self.classes_)], minlength=len(self.classes_))
            w = counts.sum() / (len(self.classes_) * np.maximum(counts, 1))
            weights = torch.as_tensor(w, dtype=torch.float32)
        elif class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight={class_weight!r}; use None or 'balanced'.")
        self.module = self._module_cls(
            backbone,
            n_classes=len(self.classes_),
            head=head,
            dropout=dropout,
            unlabeled_code=len(self.classes_),
            class_weights=weights,
        )
        self.init_kwargs_ = {"head": head, "dropout": dropout, "class_weight": class_weight}
        active = backbone.active_adapter
        self.strategy_ = strategy if active is None else backbone.adapter_specs[active].strategy
        self.calibration_: dict = {}
        self._freeze()
        self.init_params_ = self._get_init_params(locals())

    def _label_mapping(self) -> np.ndarray:
        state = self.registry_["field_registries"][REGISTRY_KEYS.LABELS_KEY]["state_registry"]
        return np.asarray(state["categorical_mapping"])

    @property
    def unlabeled_category_(self) -> str:
        return str(self._label_mapping()[-1])

    def _freeze(self) -> None:
        """The adapter's encoder-side weights and the head train; nothing else."""
        bb = self.module.backbone
        bb.set_stage("vae")
        for n, p in bb.named_parameters():
            if not n.startswith("encoder."):
                p.requires_grad_(False)
        self.module.head.requires_grad_(True)

    def parameter_report(self) -> dict[str, int | float]:
        """Trainable parameters (adapter + head) against the backbone's (no side effects:
        the flags are those :meth:`_freeze` set when the annotator was built)."""
        rep = self.module.backbone.parameter_report("vae")
        train = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        head = sum(p.numel() for p in self.module.head.parameters())
        return {
            "trainable": train,
            "head": head,
            "adapter": train - head,
            "backbone": rep["backbone"],
            "fraction": train / rep["backbone"],
        }

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        unlabeled_category: str = "Unknown",
        layer: str | None = None,
        batch_key: str | None = None,
        **kwargs,
    ) -> None:
        """Register counts and labels.

        Parameters
        ----------
        labels_key
            ``obs`` column of cell types; cells labelled ``unlabeled_category`` are not used
            to fit the classifier.
        unlabeled_category
            The label of unlabelled cells; also the label given to cells flagged as none of
            the known types.
        layer
            Layer with raw counts (``None``: ``X``).
        batch_key
            Recorded with the setup. The encoder is batch-agnostic, so predictions never
            depend on it and cells from unseen batches can be annotated.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if labels_key not in adata.obs:
            raise MissingKeyError(
                f"{labels_key!r} is not a column of adata.obs (columns: {list(adata.obs)})."
            )
        if batch_key is not None and batch_key not in adata.obs:
            raise MissingKeyError(f"{batch_key!r} is not a column of adata.obs.")
        check_not_view(adata)
        check_layer_counts(adata, layer)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category),
        ]
        cls._register(adata, fields, setup_method_args, **kwargs)

    def _shell_obs(self, adata: AnnData) -> pd.DataFrame:
        """Every cell of a foreign AnnData is unlabelled, so that unseen labels or batches
        never block prediction."""
        labels_key = self.registry_["setup_args"]["labels_key"]
        return pd.DataFrame({labels_key: self.unlabeled_category_}, index=adata.obs_names.copy())

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int = 50,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 128,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 8,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        ood_quantile: float = 0.99,
        plan_kwargs: dict | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        **trainer_kwargs,
    ) -> None:
        """Fit the adapter and head (cross-entropy), then calibrate and fit the OOD score.

        Parameters
        ----------
        max_epochs
            Upper bound; early stopping on the validation cross-entropy usually stops sooner.
        train_size, validation_size
            Split of the cells; the validation cells (at least some are needed) drive early
            stopping, the temperature and the OOD threshold.
        ood_quantile
            Share of validation cells whose OOD score stays under the threshold (the
            in-distribution false-flag rate is about ``1 - ood_quantile``).
        checkpoint_dir, resume
            As in :meth:`SCFM.train`: an epoch checkpoint in ``checkpoint_dir/annotator/fit``
            and the cells' split in ``checkpoint_dir/annotator/split.json``; ``resume=True``
            continues an interrupted call (same arguments) to the result of an
            uninterrupted one.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar=False``).
        """
        self._freeze()
        plan = {"lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW", "eps": 1e-8}
        plan.update(plan_kwargs or {})
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        root, split = self._checkpointed(
            None if checkpoint_dir is None else Path(checkpoint_dir) / "annotator",
            resume,
            train_size,
            validation_size,
            trainer_kwargs,
        )
        folder = None if root is None else root / "fit"
        if root is not None:
            history = self._restore_finished_run(folder) if resume else None
            if history is not None:  # the fit ended before the interruption
                self.train_indices, self.validation_indices, self.test_indices = split
                self.history_ = history
                self.is_trained_ = True
                self.module.eval()
                self._calibrate(ood_quantile, batch_size)
                return
        self.module.train()
        if self.strategy_ == "linear_probe":  # frozen features: no dropout inside
            self.module.backbone.eval()
        start = time.perf_counter()
        self._run_training(
            what="CellAnnotator.train",
            clip=DEFAULT_GRADIENT_CLIP,
            folder=folder,
            resume=resume,
            trainer_kwargs=trainer_kwargs,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            early_stopping_monitor="elbo_validation",
            plan_kwargs=plan,
        )
        self.module.eval()
        self._calibrate(ood_quantile, batch_size)
        self._record_training({"annotator": time.perf_counter() - start})

    @torch.inference_mode()
    def _outputs(self, adata: AnnData | None, indices=None, batch_size: int | None = None):
        self.module.eval()
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        logits, feats, labels = [], [], []
        for tensors in loader:
            out = self.module.inference(tensors[REGISTRY_KEYS.X_KEY].to(self.device))
            logits.append(out["logits"].cpu())
            feats.append(out["features"].float().cpu())
            labels.append(tensors[REGISTRY_KEYS.LABELS_KEY].view(-1).long())
        return torch.cat(logits), torch.cat(feats), torch.cat(labels)

    def _calibrate(self, ood_quantile: float, batch_size: int) -> None:
        """Temperature scaling (validation NLL) and the Mahalanobis OOD statistics."""
        from sklearn.covariance import LedoitWolf

        k = len(self.classes_)
        tr_logits, tr_feats, tr_y = self._outputs(self.adata, self.train_indices, batch_size)
        val_idx = self.validation_indices
        if val_idx is None or len(val_idx) == 0:
            warnings.warn(
                "No validation cells: the temperature stays 1 and the OOD threshold comes "
                "from training cells (optimistic). Keep train_size < 1 to calibrate.",
                stacklevel=2,
            )
            va_logits, va_feats, va_y = tr_logits, tr_feats, tr_y
        else:
            va_logits, va_feats, va_y = self._outputs(self.adata, val_idx, batch_size)
        lab = va_y < k
        temperature = 1.0
        if lab.sum() > 0 and val_idx is not None and len(val_idx):
            temperature = fit_temperature(va_logits[lab], va_y[lab])
        m = self.module
        m.temperature.fill_(temperature)
        lab_tr = tr_y < k
        feats, y = tr_feats[lab_tr].double(), tr_y[lab_tr]
        means = torch.zeros(k, feats.shape[1], dtype=torch.float64)
        for c in range(k):
            if (y == c).any():
                means[c] = feats[y == c].mean(0)
            else:
                means[c] = float("inf")  # a class without training cells is never nearest
        centred = feats - means[y]
        lw = LedoitWolf(assume_centered=True).fit(centred.numpy())
        m.class_means.copy_(means.float().to(m.class_means.device))
        m.precision.copy_(
            torch.as_tensor(lw.precision_, dtype=torch.float32).to(m.precision.device)
        )
        scores = m.ood_score(va_feats.to(m.precision.device)).cpu()
        threshold = float(torch.quantile(scores, ood_quantile))
        m.ood_threshold.fill_(threshold)
        probs = torch.softmax(va_logits[lab] / temperature, -1)
        self.calibration_ = {
            "temperature": temperature,
            "ood_threshold": threshold,
            "ood_quantile": ood_quantile,
            "n_validation": len(va_y),
            "validation_accuracy": float((probs.argmax(-1) == va_y[lab]).float().mean())
            if lab.any()
            else float("nan"),
            "validation_ece": float(expected_calibration_error(probs.numpy(), va_y[lab].numpy()))
            if lab.any()
            else float("nan"),
        }

    @contextmanager
    def observing(self, observed, batch_size: int = 256) -> Iterator[CellAnnotator]:
        """Within the block, read only the genes ``observed`` (a boolean per gene of the
        annotator; the others are masked, as for a query that lacks them).

        Masking genes moves every cell's features, so the calibration (temperature, class
        means, OOD threshold) is refitted on the annotator's own training and validation
        cells seen through the same genes: a query cell is then compared with reference
        cells as incomplete as itself, not flagged for the genes it lacks. Everything is
        restored on exit. Without its training data (a model loaded without ``adata``)
        the calibration cannot be refitted: a warning says so and the OOD flags of such a
        query are not reliable.
        """
        observed = np.asarray(observed, dtype=bool)
        bb = self.module.backbone
        if observed.shape != tuple(bb.gene_mask.shape):
            raise ValueError(
                f"observed has {observed.size} entries; the annotator reads "
                f"{bb.gene_mask.numel()} genes."
            )
        m = self.module
        saved = {
            "gene_mask": bb.gene_mask.clone(),
            **{k: getattr(m, k).clone() for k in ("temperature", "class_means", "precision")},
            "ood_threshold": m.ood_threshold.clone(),
        }
        calibration = dict(self.calibration_)
        try:
            bb.set_gene_mask(torch.as_tensor(observed) & saved["gene_mask"].cpu())
            can_refit = self.adata is not None and self.train_indices is not None
            if can_refit and not observed.all():
                self._calibrate(calibration.get("ood_quantile", 0.99), batch_size)
            elif not observed.all():
                warnings.warn(
                    "This annotator has no training data (loaded without adata): its "
                    "calibration cannot be refitted on the genes a query lacks, so its OOD "
                    "flags on such a query are not reliable. Load it with adata= its "
                    "training data.",
                    stacklevel=3,
                )
            yield self
        finally:
            bb.gene_mask.copy_(saved.pop("gene_mask"))
            for k, v in saved.items():
                getattr(m, k).copy_(v)
            self.calibration_ = calibration

    # ------------------------------------------------------------------ prediction
    def predict_details(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        min_confidence: float | None = None,
        batch_size: int | None = None,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per cell: label, confidence, OOD score and flag; and the class probabilities.

        A cell is flagged (``is_ood``) when its OOD score exceeds the fitted threshold or,
        with ``min_confidence``, its calibrated confidence is below it; its ``label`` is
        then the unlabeled category (``"Unknown"`` by default) while ``best_label`` keeps
        the most probable known type.

        Returns
        -------
        ``(table, probabilities)``: two DataFrames indexed by cell.
        """
        self._check_if_trained(warn=False)
        target = self.adata if adata is None else adata
        logits, feats, _ = self._outputs(target, indices, batch_size)
        m = self.module
        probs = torch.softmax(logits / m.temperature.cpu(), -1).numpy()
        scores = m.ood_score(feats.to(m.precision.device)).cpu().numpy()
        conf = probs.max(1)
        best = np.asarray(self.classes_, dtype=object)[probs.argmax(1)]
        flag = scores > float(m.ood_threshold)
        if min_confidence is not None:
            flag |= conf < min_confidence
        names = target.obs_names if indices is None else target.obs_names[np.asarray(indices)]
        table = pd.DataFrame(
            {
                "label": np.where(flag, self.unlabeled_category_, best),
                "best_label": best,
                "confidence": conf,
                "ood_score": scores,
                "is_ood": flag,
            },
            index=names,
        )
        return table, pd.DataFrame(probs, index=names, columns=self.classes_)

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        min_confidence: float | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predicted cell types, or with ``soft=True`` calibrated class probabilities.

        Hard predictions label flagged cells (see :meth:`predict_details`) with the
        unlabeled category instead of forcing them into a known type.
        """
        table, probs = self.predict_details(adata, indices, min_confidence, batch_size)
        return probs if soft else table["label"].to_numpy()

    def get_pathway_attributions(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        label: str | None = None,
        n_steps: int = 32,
        batch_size: int | None = 128,
    ) -> pd.DataFrame:
        """Which pathway tokens drive each cell's annotation (backbones built with
        ``tokenizer="pathway"``).

        Integrated gradients of the logit of ``label`` (default: each cell's predicted
        type) with respect to the pathway tokens, from the tokens of the average
        pretraining cell. Positive: the pathway's state in this cell, compared with the
        average cell, pushes it towards the label.

        Returns
        -------
        pandas.DataFrame
            Cells × pathways; each row sums to the logit's change from the baseline, up to
            ``attrs["completeness_gap"]``; ``attrs["label"]`` holds the explained labels.
        """
        if self.module.backbone.tokenizer != "pathway":
            raise SCFMInputError(
                "Pathway attributions need a backbone built with tokenizer='pathway'; this "
                f"one uses {self.module.backbone.tokenizer!r}."
            )
        classes = list(self.classes_)
        if label is not None and label not in classes:
            raise UnknownCategoryError(f"label={label!r} is not one of the types {classes}.")
        target_adata = self._validate_anndata(adata)
        if label is not None:
            n = target_adata.n_obs if indices is None else len(indices)
            chosen = torch.full((n,), classes.index(label))
        else:  # each cell's predicted type: one forward pass before the integrals
            chosen = self._outputs(target_adata, indices, batch_size)[0].argmax(1)
        loader = self._make_data_loader(
            adata=target_adata, indices=indices, batch_size=batch_size, shuffle=False
        )
        head = self.module.head

        def batches():
            start = 0
            for tensors in loader:
                x = tensors[REGISTRY_KEYS.X_KEY].to(self.device)
                yield {"X": x, "class": chosen[start : start + x.shape[0]].to(self.device)}
                start += x.shape[0]

        def target(features, tensors, x_norm):  # the chosen class's logit, (B,)
            logits = head(features.flatten(1)).float()
            return logits.gather(1, tensors["class"][:, None])[:, 0]

        names = target_adata.obs_names
        if indices is not None:
            names = names[np.asarray(indices)]
        df = pathway_attributions(
            self.module.backbone,
            batches(),
            target,
            self.module.backbone.hparams_["tokenizer_options"]["set_names"],
            names,
            n_steps,
        )
        df.attrs["label"] = np.asarray(classes, dtype=object)[chosen.numpy()]
        return df

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices=None,
        batch_size: int | None = None,
        pooling: str = "concat",
    ) -> np.ndarray:
        """The adapted encoder's posterior-mean embedding: its tokens joined (``"concat"``,
        as :meth:`SCFM.get_latent_representation`) or averaged (``"mean"``)."""
        if pooling not in ("concat", "mean"):
            raise ValueError(f"pooling={pooling!r}; choose 'concat' or 'mean'.")
        target = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=target, indices=indices, batch_size=batch_size)
        self.module.eval()
        bb = self.module.backbone
        out = []
        for tensors in loader:
            x_norm, _ = bb.normalize(tensors[REGISTRY_KEYS.X_KEY].to(self.device))
            z = bb.encoder(x_norm)[0]  # (B, T, d) posterior mean
            z = z.flatten(1) if pooling == "concat" else z.mean(1)
            out.append(z.float().cpu().numpy())
        return np.concatenate(out)

    # ------------------------------------------------------------------ save / load
    def _checkpoint_config(self) -> dict:
        """The backbone's config with its adapters, classes, calibration and registry."""
        return {
            "backbone": self.module.backbone.config(),
            "init_kwargs": self.init_kwargs_,
            "classes": self.classes_,
            "strategy": self.strategy_,
            "var_names": self.var_names_,
            "registry": self.registry_,
            "calibration": self.calibration_,
            "history": self.history_ or {},
        }

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Backbone (with its adapters), head, temperature and OOD statistics."""
        return self.module.backbone.checkpoint_state(owner=self.module)

    @classmethod
    def _from_checkpoint(cls, where, state: dict, config: dict, adata) -> CellAnnotator:
        """An annotator needs no AnnData to predict: ``adata`` (optional) is set up with the
        saved registry when given."""
        registry = config["registry"]
        backbone = SCFMModule.rebuild(config["backbone"])
        if adata is not None:
            check_genes(adata.var_names, config["var_names"], what="annotator")
            try:
                cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
            except SCFMInputError:  # our own errors already name the problem and the fix
                raise
            except ValueError as e:
                raise UnknownCategoryError(f"{e} (labels unknown to the annotator)") from e
        model = cls(
            adata,
            registry=registry,
            strategy=config.get("strategy", "lora"),
            _backbone=backbone,
            **config["init_kwargs"],
        )
        model.var_names_ = list(config["var_names"])
        adapt = backbone.pop_adaptation_tensors(state)
        model.module.load_state_dict(state, strict=True)
        backbone.restore_adaptation(config["backbone"]["adaptation"], adapt)
        model._freeze()
        model.calibration_ = config.get("calibration", {})
        model.history_ = config.get("history") or None
        model.is_trained_ = True
        return model

    def _summary(self) -> str:
        rep = self.parameter_report()
        cal = self.calibration_
        extra = (
            f"\n  calibrated: temperature {cal['temperature']:.3f}, OOD threshold "
            f"{cal['ood_threshold']:.2f} (q={cal['ood_quantile']})"
            if cal
            else ""
        )
        return (
            f"CellAnnotator: {len(self.classes_)} cell types on an SCFM encoder "
            f"({self.strategy_}, {self.init_kwargs_['head']} head)\n"
            f"  trainable: {rep['trainable']:,} ({rep['adapter']:,} adapter + {rep['head']:,} "
            f"head) = {rep['fraction']:.2%} of the {rep['backbone']:,}-parameter backbone" + extra
        )

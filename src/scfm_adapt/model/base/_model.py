"""``BaseModel``: the one contract every scfm_adapt model class keeps.

:class:`~scfm_adapt.model.SCFM`, :class:`~scfm_adapt.model.CellAnnotator` and
:class:`~scfm_adapt.model.PerturbationModel` all sit on it. It owns what they share:

- **the registry**: scvi-tools' :class:`~scvi.data.AnnDataManager`, built by each class's
  ``setup_anndata`` through :meth:`BaseModel._register`, saved with the model and re-applied
  to new data (category mappings included);
- **inputs**: a foreign AnnData is read through an input shell (:mod:`._inputs`), so the
  user's object is never changed; :meth:`BaseModel._batches` yields its minibatches;
- **training plumbing**: :meth:`BaseModel._run_training` runs scvi-tools' data splitter,
  training plan and Lightning trainer with the divergence guard, default gradient clipping,
  a progress bar and, with ``checkpoint_dir``, epoch checkpoints and exact resumption
  (:mod:`._training`);
- **one save / load**: :meth:`BaseModel.save` and :meth:`BaseModel.load` write and read one
  checkpoint folder (safetensors + JSON, checksummed, atomic; :mod:`._checkpoint`) through
  three hooks a model class fills in: :meth:`_checkpoint_config`,
  :meth:`_checkpoint_state` and :meth:`_from_checkpoint`.

Feature mixins of a model (generation, adaptation, ...) use only what is defined here or
what they declare themselves (as class annotations); ``tests/model/test_contracts.py``
checks that.
"""

from __future__ import annotations

import functools
import logging
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.module.base import BaseModuleClass

from ..._version import __version__
from ...data._block_loader import BlockAnnDataLoader, BlockDataSplitter
from ...errors import CheckpointError, SCFMInputError, UnknownCategoryError
from ...train import RNGState, guarded
from ._checkpoint import CARD, read_checkpoint, write_checkpoint
from ._inputs import (
    SHELL_OF,
    UNKNOWN_CATEGORY_FIX,
    copied_obs,
    input_shell,
    setup_obs_keys,
    transfer_errors,
)
from ._training import checkpointing, finished_run, mark_finished, read_split, write_split

logger = logging.getLogger(__name__)

#: Errors of building a model from a checkpoint that mean "the files do not fit together".
_MISFIT = (RuntimeError, KeyError, TypeError, IndexError, AttributeError, ValueError)


QUANTIZED_ERROR = (
    "A quantized model is for inference only; {what}() is not available. Train/save the "
    "float model and call quantize() again."
)


def inference_only(fn):
    """Mark a method an inference-only (quantized) copy of a model refuses: it trains,
    writes a checkpoint, or adds, switches or folds adapters, whose LoRA wrappers the
    quantized copy no longer has. On such a copy it raises :class:`RuntimeError`; the
    signature and docstring are kept."""

    @functools.wraps(fn)
    def guarded(self, *args, **kwargs):
        if getattr(self, "is_quantized_", False):
            raise RuntimeError(QUANTIZED_ERROR.format(what=fn.__name__))
        return fn(self, *args, **kwargs)

    guarded.inference_only = True
    return guarded


@contextmanager
def seeded(seed: int | None, device: torch.device):
    """Seed torch's generators inside the block and restore the caller's state after."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class BaseModel(UnsupervisedTrainingMixin, BaseModelClass):
    """Registry, input shells, training plumbing and one save / load for every model.

    A subclass defines ``setup_anndata`` (building its fields with :meth:`_register`),
    :meth:`_summary`, and the three checkpoint hooks.
    """

    # Backed data are read in contiguous runs with block-shuffled minibatches; in memory
    # these are scvi-tools' loader and splitter unchanged.
    _data_loader_cls = BlockAnnDataLoader
    _data_splitter_cls = BlockDataSplitter

    # Set by scvi-tools' BaseModelClass: the registry of the setup (saved with the model),
    # its summary (sizes), the model's id, whether it is trained and its history.
    registry_: dict
    summary_stats: dict
    id: str
    is_trained_: bool
    history_: dict | None
    #: The scvi-tools module (tensors in, ``LossOutput`` out) the model trains and runs.
    module: BaseModuleClass
    #: Genes the model reads, in its order.
    var_names_: list[str]
    #: JSON arguments that rebuild the model (saved with it).
    init_kwargs_: dict
    #: How many input shells keep their scvi-tools registration (older ones are dropped).
    _N_SHELLS = 4
    #: Whether an input shell may reorder genes that come in another order than the model's
    #: (otherwise that is a :class:`~scfm_adapt.errors.GeneMismatchError`).
    _reorders_genes = True
    #: Who owns the genes, in error messages about them.
    _genes_owner = "model"
    #: The fix an error about a category the model never saw names.
    _unknown_category_fix = UNKNOWN_CATEGORY_FIX

    # ------------------------------------------------------------------ registry
    @classmethod
    def _register(cls, adata, fields: list, setup_method_args: dict, **kwargs) -> None:
        """Register ``adata`` with ``fields`` in a new manager of this class."""
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        transfer_errors(manager.register_fields, adata, fix=cls._unknown_category_fix, **kwargs)
        cls.register_manager(manager)

    def _registry_sizes(self) -> dict:
        """Categories per registered covariate: ``{"batch", "labels", "cat_covs"}``."""
        stats = self.summary_stats
        cat_state = self.registry_["field_registries"].get(REGISTRY_KEYS.CAT_COVS_KEY, {})
        n_cats = list(cat_state.get("state_registry", {}).get("n_cats_per_key", []))
        return {"batch": stats.n_batch, "labels": stats.n_labels, "cat_covs": n_cats}

    def _batch_code(self, transform_batch) -> int | None:
        """The registry code of batch ``transform_batch`` (``None`` stays ``None``)."""
        if transform_batch is None:
            return None
        mapping = list(
            self.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        )
        if transform_batch not in mapping:
            raise UnknownCategoryError(
                f"transform_batch={transform_batch!r} is not a batch of the model ({mapping})."
            )
        return mapping.index(transform_batch)

    @property
    def _layer(self) -> str | None:
        """The layer of counts the model was set up with (``None``: ``X``)."""
        return self.registry_["setup_args"].get("layer")

    def _counts_matrix(self, data):
        """The counts matrix the model reads from ``data`` (``X`` or its layer)."""
        from ...data import get_matrix

        return get_matrix(data, self._layer)

    @classmethod
    def trained_model(cls, model, what: str = "model"):
        """``model`` itself, or the model saved in folder ``model``; it must be trained
        and not an inference-only (quantized) copy, since it is the base of a new model."""
        if isinstance(model, str | Path):
            model = cls.load(model)
        if not isinstance(model, cls):
            raise TypeError(
                f"{what} must be a {cls.__name__} or a folder holding one, not "
                f"{type(model).__name__}."
            )
        if not model.is_trained_:
            raise ValueError(f"The {what} {cls.__name__} is not trained; train it first.")
        if getattr(model, "is_quantized_", False):
            raise RuntimeError(
                f"The {what} is quantized (inference only) and cannot be the base of a new "
                "model: pass the float model."
            )
        return model

    # ------------------------------------------------------------------ inputs
    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        if adata is not None and adata is not self.adata:
            adata = self._model_input(adata)
        return transfer_errors(
            super()._validate_anndata, adata, copy_if_view, fix=self._unknown_category_fix
        )

    def _model_input(self, adata):
        """What scvi-tools registers for a foreign ``adata``: its input shell."""
        if self._is_shell(adata):
            return adata
        if self._checked(adata):
            return self._trusted[1]
        return self._input_shell(adata)

    def _shell_obs(self, adata: AnnData) -> pd.DataFrame:
        """The ``obs`` of an input shell: the columns the model was set up with."""
        return copied_obs(adata, setup_obs_keys(self.registry_["setup_args"]))

    def _input_shell(self, adata: AnnData) -> AnnData:
        """A new AnnData over ``adata``'s counts for scvi-tools to register (see
        :func:`~scfm_adapt.model.base._inputs.input_shell`)."""
        return input_shell(
            adata,
            layer=self._layer,
            var_names=self.var_names_,
            obs=self._shell_obs,
            owner=self.id,
            reorder=self._reorders_genes,
            what=self._genes_owner,
        )

    def _is_shell(self, adata) -> bool:
        return isinstance(adata, AnnData) and adata.uns.get(SHELL_OF) == self.id

    def _register_manager_for_instance(self, adata_manager) -> None:
        super()._register_manager_for_instance(adata_manager)
        if not self._is_shell(adata_manager.adata):
            return
        # Each call on a foreign AnnData registers a new shell: keep the store bounded.
        shells = self.__dict__.setdefault("_shell_ids", [])
        shells.append(adata_manager.adata_uuid)
        store = self._per_instance_manager_store.get(self.id, {})
        while len(shells) > self._N_SHELLS:
            store.pop(shells.pop(0), None)

    def _checked(self, adata) -> bool:
        """Whether ``adata`` is the object :meth:`_trusting` vouches for right now."""
        trusted = getattr(self, "_trusted", None)
        return trusted is not None and trusted[0]() is adata

    @contextmanager
    def _trusting(self, adata):
        """Check ``adata`` once (and build its input shell once), then reuse that for this
        very object until the block ends: chunked inference calls the model once per
        chunk, and each check is a pass over a backed atlas's counts."""
        validated = self._validate_anndata(adata)
        self._trusted = (weakref.ref(adata), validated)
        try:
            yield
        finally:
            self._trusted = None

    def _batches(
        self, adata: AnnData | None, indices: Sequence[int] | None, batch_size: int | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Minibatches of ``adata`` (default: the training data) on the model's device."""
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        device = self.module.device
        for tensors in loader:
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in tensors.items()}

    # ------------------------------------------------------------------ training
    def _run_training(
        self,
        *,
        what: str,
        clip: float,
        folder: Path | None = None,
        resume: bool = False,
        trainer_kwargs: dict | None = None,
        **train_kwargs,
    ) -> None:
        """One scvi-tools training run (data splitter, training plan, Lightning trainer).

        The run gets the divergence guard and default gradient clipping
        (:func:`~scfm_adapt.train.guarded`, named ``what`` in its errors), the random-number
        state callback (so a resumed run continues like an uninterrupted one) and, with
        ``folder``, an epoch checkpoint there (resumed from with ``resume``) and, when the
        run ends, ``done.json`` (see :meth:`_restore_finished_run`).
        ``train_kwargs`` are scvi-tools' ``train`` arguments (``max_epochs``,
        ``plan_kwargs``, ``batch_size``, ...); ``trainer_kwargs`` go to the trainer.
        """
        # scvi-tools' Trainer appends its own callbacks to the list it is given: each run
        # gets a fresh list, or a second run would inherit the first's early stopping.
        kwargs = dict(trainer_kwargs or {})
        kwargs = guarded(
            {**kwargs, "callbacks": [*(kwargs.get("callbacks") or []), RNGState()]}, what, clip
        )
        if folder is not None:
            extra = checkpointing(folder, resume)
            kwargs["callbacks"] += extra.pop("callbacks")
            kwargs.update(extra)
        with warnings.catch_warnings():
            # Frozen parts are in eval mode on purpose (no dropout while they encode).
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
            UnsupervisedTrainingMixin.train(self, **train_kwargs, **kwargs)
        if folder is not None:  # a resumed call restores this run instead of repeating it
            mark_finished(folder, self.history_ or {})

    def _fixed_split(
        self, root: Path, resume: bool, train_size: float, validation_size: float | None
    ) -> list[np.ndarray]:
        """The cells' train / validation / test split of a checkpointed call: the one in
        ``root/split.json`` when there is one (a resumed call, or the next stage of the same
        model), never overwritten; else drawn by scvi-tools' data splitter (as an unchecked
        run would draw it) and written there."""
        split = read_split(root, self.adata.n_obs)
        if split is not None:
            return split
        splitter = self._data_splitter_cls(
            self.adata_manager, train_size=train_size, validation_size=validation_size
        )
        splitter.setup()
        split = [np.asarray(i) for i in (splitter.train_idx, splitter.val_idx, splitter.test_idx)]
        write_split(root, self.adata.n_obs, split)
        return split

    def _restore_finished_run(self, folder: Path) -> dict | None:
        """On resume: load the weights of a run that ended before the interruption and
        return its history (``None`` when it did not end)."""
        found = finished_run(folder)
        if found is None:
            return None
        state, history = found
        self.module.load_state_dict(state, strict=True)
        logger.info("The run in %s ended before the interruption: restored.", folder)
        return history

    @staticmethod
    def _checkpoint_folder(checkpoint_dir, resume: bool) -> Path | None:
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the interrupted run.")
        return None if checkpoint_dir is None else Path(checkpoint_dir)

    def _checkpointed(
        self,
        checkpoint_dir,
        resume: bool,
        train_size: float,
        validation_size: float | None,
        trainer_kwargs: dict,
    ) -> tuple[Path | None, list[np.ndarray] | None]:
        """``(root, split)`` of a checkpointed call (``(None, None)`` without
        ``checkpoint_dir``); the fixed split goes into ``trainer_kwargs``' data splitter
        arguments, so that every run of the call trains on the same cells."""
        root = self._checkpoint_folder(checkpoint_dir, resume)
        if root is None:
            return None, None
        split = self._fixed_split(root, resume, train_size, validation_size)
        ds_kwargs = dict(trainer_kwargs.pop("datasplitter_kwargs", None) or {})
        trainer_kwargs["datasplitter_kwargs"] = {**ds_kwargs, "external_indexing": split}
        return root, split

    # ------------------------------------------------------------------ save / load
    def _checkpoint_config(self) -> dict:
        """JSON of everything but the weights that rebuilds this model (a hook)."""
        raise NotImplementedError

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The tensors of this model, by name (a hook)."""
        raise NotImplementedError

    @classmethod
    def _from_checkpoint(cls, where, state: dict, config: dict, adata):
        """The model ``config`` describes with the weights ``state``, on ``adata`` (a hook)."""
        raise NotImplementedError

    @classmethod
    def _read_checkpoint(cls, dir_path) -> tuple[dict, dict]:
        """``(state, config)`` of a saved model (a hook for earlier folder layouts)."""
        return read_checkpoint(dir_path)

    def save(
        self, dir_path: str | Path, overwrite: bool = False, save_anndata: bool = False
    ) -> Path:
        """Save to folder ``dir_path`` (safetensors weights + JSON config), atomically.

        The config holds the model class, the library version and what the model class
        records (genes, the setup registry with its category mappings, init arguments,
        training history ...); every file's size and SHA-256 go into its manifest.
        ``save_anndata`` also writes the training data as ``adata.h5ad``. An interrupted
        save leaves any earlier checkpoint at ``dir_path`` intact.
        """
        from ._card import render_card

        self._card_checksums()
        config = {
            "model": type(self).__name__,
            "scfm_adapt_version": __version__,
            **self._checkpoint_config(),
            "card": self.card_,
        }
        state = self._checkpoint_state()
        n_weights = sum(int(v.numel()) for v in state.values())
        card = render_card(config, n_weights)
        extra = {"adata.h5ad": self.adata.write_h5ad} if save_anndata else None
        return write_checkpoint(
            dir_path,
            state,
            config,
            overwrite=overwrite,
            extra_files=extra,
            # the card is for people: edit it freely, the weights are checked without it
            unlisted_files={CARD: lambda path: path.write_text(card, encoding="utf-8")},
        )

    # ------------------------------------------------------------------ model card
    @property
    def card_(self) -> dict:
        """What the model card (``README.md`` of a saved folder, :mod:`._card`) records
        beyond the config: ``training_data`` (one record per data set: cells, genes,
        file, checksum), ``training_seconds`` per stage and ``evaluation`` figures."""
        card = self.__dict__.get("_card")
        if card is None:
            card = self.__dict__["_card"] = {
                "training_data": [],
                "training_seconds": {},
                "evaluation": {},
            }
        return card

    def record_evaluation(self, **figures: float | str) -> None:
        """Add figures of this model's own evaluation to its model card (saved with it),
        e.g. ``model.record_evaluation(knn_accuracy_heldout_donors=0.91)``."""
        for name, value in figures.items():
            if isinstance(value, np.generic):
                value = value.item()
            if not isinstance(value, int | float | str):
                raise TypeError(
                    f"record_evaluation({name}=...) takes a number or a string, not "
                    f"{type(value).__name__}."
                )
            self.card_["evaluation"][name] = value

    def _record_training(self, seconds: dict[str, float], data=None) -> None:
        """Note finished training stages on the model card: their wall times (added to
        earlier runs of the same stage), and the data they read (``data``: a list of
        :func:`._card.data_record` dicts; default: the model's AnnData)."""
        from ._card import data_record

        card = self.card_
        for stage, sec in seconds.items():
            card["training_seconds"][stage] = card["training_seconds"].get(stage, 0.0) + sec
        if data is None and self.adata is not None:
            try:  # the checksum of the counts is taken at save (a pass over the data)
                data = [data_record(self.adata, self._counts_matrix(self.adata))]
            except (KeyError, ValueError, AttributeError):  # no single counts matrix
                data = [{"name": "training data", "n_cells": int(self.adata.n_obs)}]
        if data:
            card["training_data"] = data

    def _card_checksums(self) -> None:
        """Fill in the counts checksum of the training data the card lists, from the
        model's data when it is still that data (same cells and genes)."""
        from ...data import counts_sha256

        for rec in self.card_["training_data"]:
            if rec.get("counts_sha256", "") is not None or self.adata is None:
                continue
            try:
                matrix = self._counts_matrix(self.adata)
            except (KeyError, ValueError, AttributeError):
                continue
            if (self.adata.n_obs, matrix.shape[1]) == (rec.get("n_cells"), rec.get("n_genes")):
                rec["counts_sha256"] = counts_sha256(matrix)

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
    ):
        """Load a model saved by :meth:`save`, onto ``adata`` when given.

        Raises
        ------
        CheckpointError
            Missing, truncated or modified files, an unknown format, another model class,
            or weights that do not fit the config.
        GeneMismatchError
            ``adata``'s genes differ from the model's.
        UnknownCategoryError
            ``adata`` holds a category the model never saw.
        """
        state, config = cls._read_checkpoint(dir_path)
        if config.get("model") != cls.__name__:
            raise CheckpointError(
                f"{dir_path} holds a {config.get('model')}, not a {cls.__name__}; "
                f"load it with scfm_adapt.model.{config.get('model')}.load."
            )
        try:
            model = cls._from_checkpoint(dir_path, state, config, adata)
            card = config.get("card")
            if card:  # saves before model cards have none
                model.card_.update(card)
        except SCFMInputError:
            raise
        except _MISFIT as e:
            raise CheckpointError(
                f"{dir_path}: the weights do not fit the config ({type(e).__name__}: "
                f"{str(e)[:300]}). The checkpoint is damaged, was edited, or its files come "
                "from different saves; re-save or re-download it."
            ) from e
        from scvi.model._utils import parse_device_args

        _, _, dev = parse_device_args(
            accelerator=accelerator, devices=device, return_device="torch"
        )
        model.to_device(dev)
        model.module.eval()
        return model

    # ------------------------------------------------------------------ printing
    def _summary(self) -> str:
        """What ``repr(model)`` prints: sizes, parts, training state (a hook)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self._summary()

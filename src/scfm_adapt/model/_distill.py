"""``distill``: train a smaller student SCFM that reproduces a trained teacher SCFM."""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import torch
from anndata import AnnData
from scvi.dataloaders import DataSplitter
from scvi.model._utils import get_max_epochs_heuristic, use_distributed_sampler
from scvi.train import TrainingPlan, TrainRunner

from ..data import gene_order, merge_batch_gene_masks
from ..errors import GeneMismatchError
from ..module import DistillationModule
from ..train import guarded
from ._scfm import SCFM
from ._tokenizers import BACKBONE_TOKENIZERS
from .base import transfer_errors

logger = logging.getLogger(__name__)


def _teacher_split(teacher: SCFM) -> list[np.ndarray] | None:
    """The teacher's train / validation / test cells, when it was trained in this session."""
    idx = (teacher.train_indices, teacher.validation_indices, teacher.test_indices)
    if idx[0] is None:
        return None
    return [np.asarray([] if i is None else i, dtype=np.int64) for i in idx]


#: Buffers of the module that describe the data (same genes: same values), when present.
_DATA_BUFFERS = ("ref_gene_frac", "gene_mask")


def _copy_data_state(teacher: SCFM, student: SCFM) -> None:
    """Start the student from the teacher's per-gene state: data buffers and dispersion."""
    t, s = teacher.module, student.module
    for name in _DATA_BUFFERS:
        src, dst = getattr(t, name, None), getattr(s, name, None)
        if src is not None and dst is not None and src.shape == dst.shape:
            dst.copy_(src)
    if t.tokenizer == s.tokenizer:  # gene sets, graphs and medians: the tokenizer's data
        own = dict(s.encoder.named_buffers())
        for name, buf in t.encoder.named_buffers():
            if name in own and own[name].shape == buf.shape:
                own[name].copy_(buf)
    px_r = t.px_r
    if getattr(t, "px_r_extra", None) is not None:  # dispersion of categories added later
        px_r = torch.cat([px_r, t.px_r_extra], 1)
    if px_r.shape == s.px_r.shape:
        s.px_r.copy_(px_r)


def _copy_prior(teacher: SCFM, student: SCFM) -> bool:
    """Give the student the teacher's DiT prior (same token shape); ``True`` if it had one."""
    if "prior" not in teacher.trained_stages_:
        return False
    t, s = teacher.module, student.module
    s.dit.load_state_dict(t.dit.state_dict())
    s.dit_ema.load_state_dict(t.dit_ema.state_dict())
    s.latent_scale.copy_(t.latent_scale)
    s.ema_steps.copy_(t.ema_steps)
    return True


def distill(
    teacher: SCFM,
    adata: AnnData | None = None,
    *,
    encoder_hidden: int = 32,
    encoder_depth: int = 1,
    decoder_hidden: int = 128,
    n_heads: int | None = None,
    max_epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    latent_weight: float = 1.0,
    latent_kl_weight: float = 1.0,
    decoder_weight: float = 1.0,
    nll_weight: float = 1.0,
    train_size: float | None = None,
    validation_size: float | None = None,
    early_stopping: bool = True,
    early_stopping_patience: int = 20,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    plan_kwargs: dict | None = None,
    **trainer_kwargs,
) -> SCFM:
    """Distil a trained SCFM into a smaller one with the same latent shape.

    The student keeps the teacher's genes, registry, likelihood, dispersion and latent shape
    ``(n_tokens, token_dim)``, with a narrower and shallower encoder and decoder. It is
    trained (scvi-tools' data splitter, training plan and Lightning trainer, with early
    stopping on the validation loss) to match the teacher's posterior over tokens and its
    decoded gene fractions, while fitting the counts itself; see
    :class:`~scfm_adapt.module.DistillationModule` for the loss. Because the token shape
    matches, the teacher's DiT prior (weights, EMA and latent scale) is copied into the
    student, so a student of a fully trained teacher can generate cells too.

    The teacher is not modified: a frozen copy of its module is used.

    Parameters
    ----------
    teacher
        A trained :class:`~scfm_adapt.model.SCFM` (at least its VAE stage).
    adata
        Cells to distil on, with the teacher's genes (validated and registered like a query
        of the teacher); defaults to the teacher's training data.
    encoder_hidden, encoder_depth, n_heads, decoder_hidden
        Sizes of the student (``n_heads`` defaults to the teacher's and must divide
        ``encoder_hidden``). All other sizes are the teacher's.
    max_epochs
        Maximum epochs; ``None`` uses scvi-tools' heuristic for the data size.
    batch_size, lr
        Minibatch size and learning rate.
    latent_weight, latent_kl_weight, decoder_weight, nll_weight
        Weights of the loss terms: squared error between the posterior means, KL between
        the posteriors, library-size-scaled KL between the decoded gene fractions, and the
        student's count negative log-likelihood.
    train_size, validation_size
        Data split. When both are ``None`` and the student trains on the teacher's own data,
        the teacher's train / validation / test cells are reused, so the student never
        trains on cells the teacher held out; otherwise a fresh split (default 90% / 10%).
    early_stopping, early_stopping_patience
        Early stopping on ``elbo_validation`` (here the distillation loss); switched off
        when there are no validation cells.
    accelerator, devices
        Lightning accelerator and devices.
    plan_kwargs
        Extra :class:`scvi.train.TrainingPlan` arguments (optimizer, weight decay ...).
    **trainer_kwargs
        Passed to :class:`scvi.train.Trainer`, e.g. ``enable_progress_bar=False``.

    Returns
    -------
    The trained student, an ordinary :class:`~scfm_adapt.model.SCFM`: stage ``"vae"``
    trained (and ``"prior"`` when copied from the teacher); its ``history["vae"]`` holds
    the distillation curves (``elbo_*`` is the total loss; ``latent_mse_*``,
    ``latent_kl_*``, ``decoder_kl_*``, ``student_nll_*`` the terms).

    Raises
    ------
    RuntimeError
        When the teacher's VAE is not trained.
    GeneMismatchError, UnknownCategoryError, InvalidCountsError
        When ``adata`` does not fit the teacher.

    Examples
    --------
    >>> student = sfa.model.distill(teacher, max_epochs=50)
    >>> student.get_latent_representation()  # close to teacher.get_latent_representation()
    """
    if not isinstance(teacher, SCFM):
        raise TypeError(f"teacher must be an SCFM, got {type(teacher).__name__}.")
    if "vae" not in teacher.trained_stages_:
        raise RuntimeError(
            "The teacher is not trained: train it first (teacher.train(stage='vae') at least) "
            "or load a trained one; distilling an untrained model teaches nothing."
        )
    if adata is None and teacher.adata is None:
        raise ValueError("The teacher was loaded without data: pass the cells to distil on.")
    if adata is None or adata is teacher.adata:
        data = teacher.adata
        SCFM.register_manager(teacher.get_anndata_manager(data, required=True))
    else:
        teacher._validate_anndata(adata)  # genes, counts, categories (on a private shell)
        if gene_order(adata.var_names, teacher.var_names_) is not None:
            raise GeneMismatchError(
                "adata has the teacher's genes in another order; the student trains on adata "
                "itself, so reorder it first: `adata = adata[:, teacher.var_names_].copy()`."
            )
        # The student is set up on the cells it learns from, as setup_anndata would do.
        data = adata
        SCFM.register_manager(transfer_errors(teacher.adata_manager.transfer_fields, data))

    sizes = {
        "encoder_hidden": encoder_hidden,
        "encoder_depth": encoder_depth,
        "decoder_hidden": decoder_hidden,
    }
    if n_heads is not None:
        sizes["n_heads"] = n_heads
    kwargs = {**teacher.init_kwargs_, **sizes}
    if kwargs.get("tokenizer") in BACKBONE_TOKENIZERS:
        # Distillation shrinks the encoder; a frozen external backbone is not what it can
        # shrink.
        name = kwargs.pop("tokenizer")
        kwargs.pop("tokenizer_options")
        logger.info("The student of a %s-backed teacher reads cells with 'latent' tokens.", name)
    student = SCFM(data, **kwargs)
    # the teacher's batch gene panels (from its checkpoint or a query mapping), beside any
    # in data.uns: a gene a batch never measured stays unobserved for the student too
    panels = merge_batch_gene_masks(teacher.batch_gene_masks_, student.batch_gene_masks_)
    if panels:
        student.batch_gene_masks_ = panels
        student._set_batch_gene_masks(student.module)
    with torch.no_grad():
        _copy_data_state(teacher, student)
        has_prior = _copy_prior(teacher, student)

    distiller = DistillationModule(
        copy.deepcopy(teacher.module),
        student.module,
        latent_weight=latent_weight,
        latent_kl_weight=latent_kl_weight,
        decoder_weight=decoder_weight,
        nll_weight=nll_weight,
    )
    split = None
    if train_size is None and validation_size is None and data is teacher.adata:
        split = _teacher_split(teacher)
    splitter = DataSplitter(
        student.adata_manager,
        train_size=train_size,
        validation_size=validation_size,
        external_indexing=split,
        batch_size=batch_size,
        distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy")),
    )
    if split is not None and len(split[1]) == 0 and early_stopping:
        logger.info("No validation cells in the teacher's split: early stopping is off.")
        early_stopping = False
    plan = TrainingPlan(distiller, lr=lr, **(plan_kwargs or {}))
    trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
    trainer_kwargs = guarded(trainer_kwargs, "distill")
    runner = TrainRunner(
        student,
        training_plan=plan,
        data_splitter=splitter,
        max_epochs=max_epochs or get_max_epochs_heuristic(data.n_obs),
        accelerator=accelerator,
        devices=devices,
        early_stopping=early_stopping,
        early_stopping_patience=early_stopping_patience,
        early_stopping_monitor="elbo_validation",
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        # The frozen teacher and the student's DiT are in eval mode on purpose.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        runner()

    student.histories_ = {"vae": student.history_ or {}}
    student.trained_stages_ = ["vae", "prior"] if has_prior else ["vae"]
    student.module.set_stage("vae")
    student.module.eval()
    student.is_trained_ = True
    return student

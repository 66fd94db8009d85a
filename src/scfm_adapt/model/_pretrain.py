"""Pretraining across files: ``scfm_adapt.model.pretrain`` and ``scfm-adapt pretrain``.

One call takes h5ad files with different genes to a saved reference model: the files
are combined on disk over one gene vocabulary (:func:`~scfm_adapt.data.combine_h5ad`:
each file a batch, the genes it lacks masked for its cells), an :class:`SCFM` is trained
on the backed result (both stages by default, with epoch checkpoints, so an interrupted
run resumes), and the model is saved with a model card that lists every file with its
cells and SHA-256 and the reconstruction NLL of the validation cells.

With ``devices > 1`` Lightning's DDP starts the other processes by running the same
script again once training begins (its subprocess launcher, ``LOCAL_RANK`` set): such a
worker reuses the folder the first process has prepared (its run record, combined file and
data split), trains beside it, and leaves the evaluation and the save to it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: What ``out`` holds after :func:`pretrain`.
DATA_FILE, MODEL_DIR, CHECKPOINTS_DIR, RUN_FILE = "data.h5ad", "model", "checkpoints", "run.json"


def pretrain(
    files: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    genes: str | Sequence[str] = "union",
    batch_key: str = "dataset",
    batch_labels: Sequence[str] | None = None,
    labels_key: str | None = None,
    gene_ids: str | None = None,
    layer: str | None = None,
    stage: str = "both",
    max_epochs: int | None = None,
    resume: bool = False,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    progress: bool = True,
):
    """Pretrain an :class:`SCFM` reference on several h5ad files and save it.

    Parameters
    ----------
    files
        h5ad files of raw counts; they may measure different genes.
    out
        Folder for the run: ``data.h5ad`` (the combined counts, read backed),
        ``checkpoints/`` (epoch checkpoints), ``run.json`` (the arguments) and ``model/``
        (the saved model, with its ``README.md`` model card).
    genes, batch_key, batch_labels, gene_ids, layer
        How the files are combined (:func:`~scfm_adapt.data.combine_h5ad`); each file is
        one batch of the model (``obs[batch_key]``).
    labels_key
        An ``obs`` column every file has, registered as the model's labels (optional).
    stage, max_epochs
        What :meth:`SCFM.train` trains (``"both"``: the VAE, then the DiT prior).
    resume
        Continue an interrupted run of the same arguments in ``out`` (the combined file
        is reused and training resumes from its last epoch checkpoint).
    model_kwargs, train_kwargs
        Passed to :class:`SCFM` (sizes, likelihood) and :meth:`SCFM.train`
        (``accelerator``, ``devices``, ``batch_size``, ``prior_steps``, ...; with
        ``devices > 1`` Lightning trains data-parallel).

    Returns
    -------
    The trained :class:`SCFM`, on the backed combined data.
    """
    from ..data import combine_h5ad
    from ..data._combine import SOURCES_KEY
    from ._scfm import SCFM

    out = Path(out)
    files = [str(Path(f).resolve()) for f in files]
    run = {
        "files": files,
        "genes": genes if isinstance(genes, str) else list(genes),
        "batch_key": batch_key,
        "batch_labels": None if batch_labels is None else list(batch_labels),
        "labels_key": labels_key,
        "gene_ids": gene_ids,
        "layer": layer,
        "stage": stage,
        "max_epochs": max_epochs,
        "model_kwargs": model_kwargs or {},
        "train_kwargs": {k: v for k, v in (train_kwargs or {}).items() if _jsonable(v)},
    }
    run = json.loads(json.dumps(run))  # as run.json holds it (tuples become lists)
    run_file = out / RUN_FILE
    worker = ddp_worker()
    if worker:  # the first process has checked and written the folder before training
        if not (run_file.exists() and (out / DATA_FILE).exists()):
            raise RuntimeError(
                f"This process (LOCAL_RANK={os.environ.get('LOCAL_RANK')}) is a data-parallel "
                f"worker, but {out} holds no prepared run: start pretrain once, with "
                "devices > 1, and let Lightning start the workers (not torchrun)."
            )
    elif resume:
        if not run_file.exists():
            raise FileNotFoundError(
                f"Nothing to resume in {out} (no {RUN_FILE}); run without resume=True first."
            )
        before = json.loads(run_file.read_text())
        if before != run:
            changed = sorted(k for k in run if before.get(k) != run[k])
            raise ValueError(
                f"resume=True continues the run in {out} with the same arguments; these "
                f"differ: {changed}. Use another `out` for a new run."
            )
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty; pass resume=True to continue its run, or another folder."
        )
    if not worker:
        out.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(run, indent=1))

    data_path = out / DATA_FILE
    if (resume or worker) and data_path.exists():
        import anndata as ad

        adata = ad.read_h5ad(data_path, backed="r")
    else:
        adata = combine_h5ad(
            files,
            data_path,
            genes=genes,
            batch_key=batch_key,
            batch_labels=batch_labels,
            obs_keys=None if labels_key is None else [labels_key],
            gene_ids=gene_ids,
            layer=layer,
            overwrite=True,
            progress=progress,
        )
    SCFM.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key)
    model = SCFM(adata, **(model_kwargs or {}))
    kwargs = {"enable_progress_bar": progress, **(train_kwargs or {})}
    model.train(
        max_epochs=max_epochs,
        stage=stage,
        checkpoint_dir=out / CHECKPOINTS_DIR,
        resume=resume,
        **kwargs,
    )
    if worker:  # the first process evaluates and saves
        return model
    val = model.validation_indices
    if val is not None and len(val) > 0:  # the model card's own evaluation: held-out cells
        nll = model.get_reconstruction_error(indices=val)["reconstruction_loss"]
        model.record_evaluation(
            validation_cells=len(val), validation_reconstruction_nll=round(float(nll), 3)
        )
    sources = adata.uns[SOURCES_KEY]
    order = [str(b) for b in adata.obs[batch_key].cat.categories]  # the files' order
    model.card_["training_data"] = [
        {"name": label, **{k: _plain(v) for k, v in sources[label].items()}}
        for label in order
        if label in sources
    ]
    model.save(out / MODEL_DIR, overwrite=True)
    logger.info("Saved the pretrained model to %s", out / MODEL_DIR)
    return model


def ddp_worker() -> bool:
    """Whether this process is a DDP worker that Lightning started (``LOCAL_RANK`` > 0
    before training: its subprocess launcher sets it for the processes it starts)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
    except TypeError:
        return False
    return True


def _plain(v):
    """A value read from h5ad ``uns`` (numpy scalars, 0-d arrays) as plain Python."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v

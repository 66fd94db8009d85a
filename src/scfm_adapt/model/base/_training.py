"""Checkpointed training runs: an epoch checkpoint per run, a fixed split, and resuming.

A model trained with ``checkpoint_dir`` writes, per run (an SCFM stage, an annotator's
fit), ``<checkpoint_dir>/<run>/last.ckpt`` after every epoch (weights, optimiser, epoch,
early-stopping and random-number states; :class:`~scfm_adapt.train.EpochCheckpoint`) and
``done.json`` when the run ends. The cells' train / validation / test split is kept in
``<checkpoint_dir>/split.json``, so a resumed run (in a new process, under another seed)
trains on the same cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...train import EpochCheckpoint
from ._checkpoint import read_json, write_json

SPLITS = ("train", "validation", "test")


def checkpointing(folder: Path, resume: bool) -> dict:
    """Trainer arguments that write ``folder/last.ckpt`` each epoch (and resume it)."""
    last = folder / "last.ckpt"
    if not resume and folder.exists() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} holds checkpoints of an earlier run; pass resume=True to continue "
            "it, or another checkpoint_dir."
        )
    out = {"callbacks": [EpochCheckpoint(last)]}
    if resume and last.exists():
        out["ckpt_path"] = str(last)
    return out


def read_split(root: Path, n_obs: int) -> list[np.ndarray] | None:
    """The split kept in ``root/split.json`` (``None`` when there is none)."""
    f = root / "split.json"
    if not f.exists():
        return None
    saved = read_json(f)
    if saved["n_obs"] != n_obs:
        raise ValueError(
            f"{f} was written for {saved['n_obs']} cells, this model has {n_obs}: resume "
            "with the data of the interrupted run."
        )
    return [np.asarray(saved[k], dtype=np.int64) for k in SPLITS]


def write_split(root: Path, n_obs: int, split: list[np.ndarray]) -> None:
    write_json(root / "split.json", {"n_obs": n_obs, **dict(zip(SPLITS, split))})


def finished_run(folder: Path) -> tuple[dict, dict] | None:
    """``(module state, history)`` of a run that ended before an interruption, else ``None``.

    Lightning checkpoints are read with ``torch.load(weights_only=True)``, which runs no code.
    """
    done, last = folder / "done.json", folder / "last.ckpt"
    if not (done.exists() and last.exists()):
        return None
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    state = {k[len("module.") :]: v for k, v in ckpt["state_dict"].items()}
    return state, read_json(done)["history"]


def mark_finished(folder: Path, history: dict) -> None:
    write_json(folder / "done.json", {"history": history})

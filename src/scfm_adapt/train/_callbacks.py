"""Lightning callbacks every scfm_adapt training run gets: a divergence guard, and the
random-number state that makes a resumed run continue like an uninterrupted one."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ..errors import TrainingDivergedError

#: Default gradient-norm clipping (``gradient_clip_val``) of stages whose loss is a count
#: likelihood summed over genes (SCFM's VAE, distillation) and of task heads: above the
#: largest norm of a normal step, so that only spikes are clipped (the norms measured by
#: ``benchmarks/grad_norms.py`` are in ``benchmarks/README.md``).
DEFAULT_GRADIENT_CLIP = 1000.0
#: Default clipping of the DiT prior, whose gradient norms are far smaller.
PRIOR_GRADIENT_CLIP = 10.0

FIX = (
    "Lower the learning rate (e.g. lr / 10), keep gradient clipping on "
    "(gradient_clip_val), train in full precision "
    "(precision='32', not '16-mixed'), and check the data for extreme counts. The model "
    "keeps the weights of the last finite step."
)


class DivergenceGuard(Callback):
    """Stop training at the first NaN or infinite loss or gradient, before it reaches the
    weights, with a :class:`~scfm_adapt.errors.TrainingDivergedError` that names the
    epoch, step and batch, and how to fix it."""

    def __init__(self, what: str = "training"):
        self.what = what
        self._batch = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch_idx

    def _raise(self, trainer, value: str) -> None:
        raise TrainingDivergedError(
            f"{self.what}: {value} at epoch {trainer.current_epoch}, step {trainer.global_step} "
            f"(batch {self._batch} of the epoch). {FIX}"
        )

    def on_before_backward(self, trainer, pl_module, loss):
        if not torch.isfinite(loss.detach()).all():
            self._raise(trainer, f"the loss became {loss.detach().float().sum().item()}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            self._raise(trainer, "a gradient became NaN or infinite")


def guarded(trainer_kwargs: dict, what: str, clip: float = DEFAULT_GRADIENT_CLIP) -> dict:
    """A copy of ``trainer_kwargs`` with gradient clipping at ``clip`` unless the caller set
    ``gradient_clip_val`` (``None`` turns it off), and a :class:`DivergenceGuard` added to
    the callbacks."""
    out = dict(trainer_kwargs)
    out.setdefault("gradient_clip_val", clip)
    out["callbacks"] = [*(out.get("callbacks") or []), DivergenceGuard(what)]
    return out


class RNGState(Callback):
    """Save the Python, NumPy and torch random states with each Lightning checkpoint and
    restore them when a run resumes, so that the shuffles and the dropout of the remaining
    epochs are those of an uninterrupted run.

    The states are taken when the checkpoint is written (the end of an epoch) and put back
    when Lightning restores the checkpoint, before the first resumed epoch draws its shuffle.
    Under DDP the checkpoint holds rank 0's states only, so a resumed multi-process run
    continues correctly but not bit for bit.
    """

    def state_dict(self) -> dict:
        np_state = np.random.get_state()  # noqa: NPY002 (the global state is what loaders use)
        state = {
            "python": random.getstate(),
            "numpy": {
                "kind": np_state[0],
                "keys": torch.as_tensor(np_state[1].astype(np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callbacks before it builds the first resumed epoch's data
        # iterator (in FitLoop.setup_data): put the states back right away.
        py = state_dict["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state_dict["numpy"]
        np.random.set_state(  # noqa: NPY002
            (
                n["kind"],
                n["keys"].numpy().astype(np.uint32),
                n["pos"],
                n["has_gauss"],
                n["cached_gaussian"],
            )
        )
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class EpochCheckpoint(Callback):
    """Write the full Lightning checkpoint (weights, optimiser, loops, callbacks' states) to
    ``path`` at the end of every training epoch, atomically (temporary file + rename)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer, pl_module):
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Every process calls it (it ends in a barrier under DDP); rank 0 writes the file.
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)

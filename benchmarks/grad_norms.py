"""Gradient norms during default training, to choose the default clipping threshold.

Trains the default SCFM (both stages) on real data sets, with clipping off, and records the
total gradient norm of every step before the optimiser step. Prints the quantiles per data
set and stage, and the share of steps whose norm exceeds the default threshold
(``sfa.train.DEFAULT_GRADIENT_CLIP``). Clipping only rescales the steps above it, so a
threshold above almost every normal step changes nothing in normal training and still
catches a blow-up.

    python benchmarks/grad_norms.py                 # pbmc68k (built-in) and Kang control
    python benchmarks/grad_norms.py --epochs 30
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import scfm_adapt as sfa


class NormRecorder(Callback):
    def __init__(self):
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))))


def run(name, adata, epochs, batch_key=None):
    scvi.settings.seed = 0
    sfa.model.SCFM.setup_anndata(adata, batch_key=batch_key)
    model = sfa.model.SCFM(adata)
    for stage in ("vae", "prior"):
        clip = sfa.train.DEFAULT_GRADIENT_CLIP if stage == "vae" else sfa.train.PRIOR_GRADIENT_CLIP
        rec = NormRecorder()
        t0 = time.perf_counter()
        model.train(
            max_epochs=epochs,
            stage=stage,
            gradient_clip_val=None,
            callbacks=[rec],
            enable_progress_bar=False,
        )
        n = np.asarray(rec.norms)
        q = np.quantile(n, [0.5, 0.9, 0.99, 1.0])
        print(
            f"{name:14s} {stage:5s} cells {adata.n_obs:6d} genes {adata.n_vars:5d} "
            f"steps {len(n):5d}  median {q[0]:8.3f}  p90 {q[1]:8.3f}  p99 {q[2]:8.3f}  "
            f"max {q[3]:8.3f}  above {clip:g}: {np.mean(n > clip):.4f}  "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--no-kang", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    run("pbmc68k", sfa.datasets.pbmc68k(), args.epochs)
    if not args.no_kang:
        run("kang_ctrl", sfa.datasets.kang2018_ctrl(), args.epochs)


if __name__ == "__main__":
    main()

"""Run CellFlow (``cellflow-tools`` 0.0.9, theislab; OT flow matching in JAX) on the exported
perturbation splits and write predictions that ``score.py`` reads.

Install and run (in CellFlow's own environment, never the project's)::

    benchmarks/peers/install.sh cellflow ../peer-venvs   # adds requests: cellflow imports it
    python benchmarks/peers/export.py ../peer-splits          # project's environment
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 JAX_PLATFORMS=cpu \\
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
    ../peer-venvs/cellflow/bin/python benchmarks/peers/cellflow_run.py \\
        ../peer-splits ../peer-preds --seed 0 --tasks kang norman_combo norman_unseen mcfaline

What it does, per fold of ``SPLITS/perturbation/<task>/fold<i>/`` (format: ``export.py``):

1. Cells: log1p(normalize_total 1e4) of the raw counts; PCA (``--n-comps``, 50 as in
   CellFlow's tutorials) fitted on the fold's training cells with CellFlow's own
   ``cellflow.preprocessing.centered_pca``; the held-out units' control cells are projected
   onto it (``project_pca``).
2. Perturbations (``perturbation_covariates``): the gene tasks put a perturbation's genes in
   two slots (``gene_1``, ``gene_2``, a combination ``A+B`` as its two genes, a single gene
   with the second slot ``"control"``), each represented by its 64-d GO vector of
   ``gene_features.csv`` (``"control"`` is the zero vector, which CellFlow masks as padding);
   CellFlow pools the slots with its attention pooling, so unseen genes and unseen
   combinations get a representation from their GO vectors. Kang's single perturbation
   ``"stim"`` is one-hot encoded by CellFlow itself (no representation given).
3. Context (cell type in kang, cell line in mcfaline) is a sample covariate and a split
   covariate (the control cells of one context are the source of that context's perturbed
   cells). Its representation is the mean PCA profile of the context's control cells in the
   training data, so a context whose perturbed cells are all held out still has an
   informative representation (a one-hot vector would be an input dimension never trained).
   CellFlow requires every control population to have perturbed cells in training, so the
   control cells of a context without any (the held-out one) are left out of CellFlow's
   training set; they still enter the PCA and the context representation.
4. Training cells whose perturbation contains a gene without a GO vector are left out
   (recorded in ``meta.json``).
5. ``CellFlow(solver="otfm")``, ``prepare_data``, ``prepare_model``, ``train``, then
   ``predict`` for every held-out unit from its control cells in ``controls.h5ad``; the
   predicted PCA coordinates are decoded back to genes with the same PCA (mean + loadings).

The network is CellFlow's (deterministic condition encoder, attention-token pooling,
concatenation conditioning, ``match_linear`` OT coupling, constant-noise path 0, Tsit5 ODE
solver with CellFlow's tolerances) at reduced widths, with plain Adam instead of the default
``MultiSteps(adam(5e-5), 20)``: the defaults (2048/4096-wide layers, batch 1024, 20-step
gradient accumulation) do not train in a few minutes on one CPU thread. Defaults here:
time encoder (256, 256) on 64 frequencies, x encoder (256, 256), decoder (512, 512),
condition embedding 64, batch 256, Adam 1e-4, 8000 iterations (about 100 s of CPU, 2.5 min
of wall time on a shared 2-core machine, per fold). The width/iteration trade-off was picked
on the training loss of one kang fold at equal CPU time (small net 8000 iterations against a
2x wider one 2500 iterations); nothing is tuned on held-out cells and there is no validation
split. Seeds change the network's initialisation (``prepare_model(seed=...)``); CellFlow's
trainer samples batches with a fixed seed of its own.

Output: ``PREDS/cellflow/seed<k>/perturbation/<task>/fold<i>.h5ad`` (one predicted cell per
row of ``controls.h5ad``, same order and ``obs["unit"]``, ``X`` predicted log1p-CP10k,
float32, on the training genes; negatives of the linear decoding are clipped to 0) and
``meta.json`` beside them (versions, settings, seconds per fold, units skipped and why).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from _cli import runner_parser

TASKS = ("kang", "norman_combo", "norman_unseen", "mcfaline")
CONTROL = "control"
GENE_SLOTS = ("gene_1", "gene_2")
GENE_REP = "gene_go"
CONTEXT_REP = "context_pca"


def pin_threads() -> None:
    """One CPU thread for JAX/XLA and BLAS (other jobs share the machine)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def load_fold(folder: Path) -> dict:
    """The fold's training cells, held-out control cells, units and GO features (if any)."""
    fold = json.loads((folder / "fold.json").read_text())
    features = folder / "gene_features.csv"
    return {
        "train": ad.read_h5ad(folder / "train.h5ad"),
        "controls": ad.read_h5ad(folder / "controls.h5ad"),
        "units": fold["units"],
        "name": fold["fold"],
        "go": pd.read_csv(features, index_col=0) if features.exists() else None,
    }


def lognorm(adata: ad.AnnData) -> ad.AnnData:
    """A dense float32 copy with log1p(counts per 10,000) in ``X`` and ``obs`` kept."""
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    x = x.astype(np.float64)
    total = x.sum(1, keepdims=True)
    x = np.log1p(x / np.maximum(total, 1e-12) * 1e4)
    out = ad.AnnData(x.astype(np.float32), obs=adata.obs.copy())
    out.var_names = adata.var_names
    return out


def fit_pca(train_ln: ad.AnnData, n_comps: int) -> tuple[np.ndarray, np.ndarray]:
    """CellFlow's ``centered_pca`` on the training cells: (gene means, loadings genes x k)."""
    import cellflow.preprocessing as cfpp

    ref = ad.AnnData(train_ln.X.copy())
    cfpp.centered_pca(ref, n_comps=n_comps, keep_centered_data=False, random_state=0)
    return np.asarray(ref.varm["X_mean"]).ravel(), np.asarray(ref.varm["PCs"])


def project(x: np.ndarray, mean: np.ndarray, pcs: np.ndarray) -> np.ndarray:
    return ((x - mean) @ pcs).astype(np.float32)


def decode(z: np.ndarray, mean: np.ndarray, pcs: np.ndarray) -> np.ndarray:
    return (z @ pcs.T + mean).astype(np.float32)


def gene_slots(perturbation: str) -> tuple[str, str]:
    """A perturbation's genes in two slots, sorted, ``"control"`` padding a single gene."""
    genes = sorted(perturbation.split("+"))
    if len(genes) > len(GENE_SLOTS):
        raise ValueError(f"more than {len(GENE_SLOTS)} genes in {perturbation!r}")
    return tuple(genes + [CONTROL] * (len(GENE_SLOTS) - len(genes)))


def covariate_columns(perturbation: str, context: str, gene_task: bool) -> dict:
    """The ``obs`` columns CellFlow reads for one perturbation in one context."""
    cols = dict(zip(GENE_SLOTS, gene_slots(perturbation))) if gene_task else {}
    if not gene_task:
        cols["treatment"] = perturbation
    cols["context"] = context
    return cols


def context_reps(train_ln: ad.AnnData, z: np.ndarray) -> dict[str, np.ndarray]:
    """Each context's representation: the mean PCA profile of its control cells."""
    obs = train_ln.obs
    reps = {}
    for ctx in sorted(obs["context"].unique()):
        is_ctrl = (obs["context"] == ctx).to_numpy() & (obs["perturbation"] == CONTROL).to_numpy()
        reps[ctx] = z[is_ctrl].mean(0).astype(np.float32)
    return reps


def usable_training_cells(obs: pd.DataFrame, go: pd.DataFrame | None) -> tuple[np.ndarray, dict]:
    """Cells CellFlow can train on, and why the others are left out.

    Left out: perturbed cells with a gene without a GO vector; control cells of a context
    without perturbed training cells (CellFlow's split covariates need a target for every
    control population).
    """
    pert = obs["perturbation"].astype(str).to_numpy()
    ctx = obs["context"].astype(str).to_numpy()
    keep = np.ones(len(obs), dtype=bool)
    dropped = {}
    if go is not None:
        known = set(go.index)
        missing = np.array(
            [p != CONTROL and not set(p.split("+")) <= known for p in pert], dtype=bool
        )
        for p in sorted(set(pert[missing])):
            dropped[f"perturbation {p}"] = f"{int((pert == p).sum())} cells: gene without GO vector"
        keep &= ~missing
    has_target = set(ctx[keep & (pert != CONTROL)])
    for c in sorted(set(ctx) - has_target):
        n = int(((ctx == c) & (pert == CONTROL)).sum())
        dropped[f"controls of context {c!r}"] = f"{n} cells: no perturbed training cells"
    keep &= np.isin(ctx, sorted(has_target))
    return keep, dropped


def training_adata(train_ln, z, keep, go, ctx_reps) -> ad.AnnData:
    """The AnnData handed to ``CellFlow``: PCA in ``obsm``, covariates in ``obs``, reps in
    ``uns``."""
    gene_task = go is not None
    obs = train_ln.obs.iloc[np.flatnonzero(keep)]
    rows = [
        covariate_columns(p, c, gene_task)
        for p, c in zip(obs["perturbation"].astype(str), obs["context"].astype(str))
    ]
    cov = pd.DataFrame(rows, index=obs.index)
    cov["control"] = (obs["perturbation"].astype(str) == CONTROL).to_numpy()
    adata = ad.AnnData(np.zeros((len(cov), 1), dtype=np.float32), obs=cov)
    adata.obsm["X_pca"] = z[keep]
    adata.uns[CONTEXT_REP] = ctx_reps
    if gene_task:
        reps = {g: go.loc[g].to_numpy(np.float32) for g in go.index}
        reps[CONTROL] = np.zeros(go.shape[1], dtype=np.float32)
        adata.uns[GENE_REP] = reps
    return adata


def prepare(adata: ad.AnnData, settings: dict, seed: int, gene_task: bool):
    """``CellFlow(solver="otfm")`` with ``prepare_data`` and ``prepare_model`` done."""
    import optax
    from cellflow.model import CellFlow

    cf = CellFlow(adata, solver="otfm")
    if gene_task:
        perturbation = {"genes": list(GENE_SLOTS)}
        reps = {"genes": GENE_REP}
    else:
        perturbation = {"treatment": ["treatment"]}
        reps = None
    cf.prepare_data(
        sample_rep="X_pca",
        control_key="control",
        perturbation_covariates=perturbation,
        perturbation_covariate_reps=reps,
        sample_covariates=["context"],
        sample_covariate_reps={"context": CONTEXT_REP},
        split_covariates=["context"],
    )
    cf.prepare_model(
        condition_embedding_dim=settings["condition_embedding_dim"],
        time_freqs=settings["time_freqs"],
        time_encoder_dims=settings["time_encoder_dims"],
        hidden_dims=settings["hidden_dims"],
        decoder_dims=settings["decoder_dims"],
        optimizer=optax.adam(settings["learning_rate"]),
        seed=seed,
    )
    return cf


def predict_units(cf, controls_ln, z_controls, units, ctx_reps, go, seed):
    """Predicted PCA coordinates for every control cell of ``controls.h5ad`` (same order;
    NaN rows for a unit that cannot be predicted, with the reason in the second value)."""
    import jax

    gene_task = go is not None
    out = np.full(z_controls.shape, np.nan, dtype=np.float32)
    skipped = {}
    unit_of_cell = controls_ln.obs["unit"].astype(str).to_numpy()
    for u in units:
        rows = np.flatnonzero(unit_of_cell == u["unit"])
        if u["context"] not in ctx_reps:
            skipped[u["unit"]] = f"context {u['context']!r} has no control cells in training"
            continue
        if gene_task and not set(u["perturbation"].split("+")) <= set(go.index):
            skipped[u["unit"]] = "a gene without GO vector"
            continue
        cols = covariate_columns(u["perturbation"], u["context"], gene_task)
        src = ad.AnnData(
            np.zeros((len(rows), 1), dtype=np.float32),
            obs=pd.DataFrame({"control": True, "context": u["context"]}, index=map(str, rows)),
        )
        src.obsm["X_pca"] = z_controls[rows]
        src.uns = dict(cf.adata.uns)
        pred = cf.predict(
            src,
            covariate_data=pd.DataFrame([{**cols, "control": False}]),
            rng=jax.random.PRNGKey(seed),
        )
        (z_pred,) = pred.values()
        out[rows] = np.asarray(z_pred)
    return out, skipped


def run_fold(folder: Path, settings: dict, seed: int) -> tuple[ad.AnnData, dict]:
    """Train on one fold and predict its held-out units; returns predictions and a record."""
    start, cpu_start = time.perf_counter(), time.process_time()
    fold = load_fold(folder)
    train_ln, controls_ln = lognorm(fold["train"]), lognorm(fold["controls"])
    controls_ln.obs["unit"] = fold["controls"].obs["unit"].astype(str).to_numpy()
    mean, pcs = fit_pca(train_ln, settings["n_comps"])
    z_train = project(train_ln.X, mean, pcs)
    z_controls = project(controls_ln.X, mean, pcs)
    ctx_reps = context_reps(train_ln, z_train)
    keep, dropped = usable_training_cells(train_ln.obs, fold["go"])
    adata = training_adata(train_ln, z_train, keep, fold["go"], ctx_reps)
    gene_task = fold["go"] is not None
    cf = prepare(adata, settings, seed, gene_task)
    t_train, cpu_train = time.perf_counter(), time.process_time()
    cf.train(num_iterations=settings["iterations"], batch_size=settings["batch_size"])
    t_pred, cpu_pred = time.perf_counter(), time.process_time()
    z_pred, skipped = predict_units(
        cf, controls_ln, z_controls, fold["units"], ctx_reps, fold["go"], seed
    )
    done = ~np.isnan(z_pred).any(1)
    x = decode(z_pred[done], mean, pcs)
    n_negative = int((x < 0).sum())
    x = np.clip(x, 0, None)
    pred = ad.AnnData(x, obs=controls_ln.obs.iloc[np.flatnonzero(done)][["unit"]].copy())
    pred.var_names = fold["train"].var_names
    end = time.perf_counter()
    loss = cf.trainer.training_logs["loss"]
    record = {
        "fold": fold["name"],
        "seconds": round(end - start, 1),
        "seconds_train": round(t_pred - t_train, 1),
        "seconds_predict": round(end - t_pred, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "cpu_seconds_train": round(cpu_pred - cpu_train, 1),
        "n_train_cells_cellflow": int(keep.sum()),
        "n_train_cells": len(keep),
        "training_cells_left_out": dropped,
        "units_predicted": [u["unit"] for u in fold["units"] if u["unit"] not in skipped],
        "units_skipped": skipped,
        "negative_values_clipped": n_negative,
        "loss_first_100": float(np.mean(loss[:100])),
        "loss_last_100": float(np.mean(loss[-100:])),
    }
    return pred, record


def versions() -> dict:
    import jax

    return {
        "cellflow-tools": importlib.metadata.version("cellflow-tools"),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "flax": importlib.metadata.version("flax"),
        "ott-jax": importlib.metadata.version("ott-jax"),
        "requests (added to the venv)": importlib.metadata.version("requests"),
    }


def run_task(splits: Path, preds: Path, task: str, settings: dict, seed: int, only=None) -> None:
    """Every fold of one task (or those numbered in ``only``); writes ``fold<i>.h5ad`` and
    ``meta.json``."""
    folds = sorted((splits / "perturbation" / task).glob("fold*"), key=lambda p: int(p.name[4:]))
    folds = [f for f in folds if only is None or int(f.name[4:]) in only]
    out = preds / "cellflow" / f"seed{seed}" / "perturbation" / task
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "peer": "cellflow",
        "package": "cellflow-tools",
        "version": importlib.metadata.version("cellflow-tools"),
        "versions": versions(),
        "seed": seed,
        "task": task,
        "settings": settings,
        "folds": {},
    }
    for folder in folds:
        print(f"[cellflow] {task}/{folder.name} seed {seed}", flush=True)
        pred, record = run_fold(folder, settings, seed)
        pred.write_h5ad(out / f"{folder.name}.h5ad")
        meta["folds"][folder.name] = record
        print(f"[cellflow] {task}/{folder.name}: {json.dumps(record)}", flush=True)
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
    meta["seconds_total"] = round(sum(r["seconds"] for r in meta["folds"].values()), 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def settings_from(args: argparse.Namespace) -> dict:
    """The run's settings as recorded in ``meta.json``."""
    return {
        "solver": "otfm",
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "optimizer": "optax.adam",
        "n_comps": args.n_comps,
        "representation": "PCA of log1p(normalize_total 1e4), fitted on the fold's training "
        "cells (cellflow.preprocessing.centered_pca); decoded with the same PCA, negatives "
        "clipped to 0",
        "condition_embedding_dim": args.condition_embedding_dim,
        "time_freqs": args.time_freqs,
        "time_encoder_dims": list(args.time_encoder_dims),
        "hidden_dims": list(args.hidden_dims),
        "decoder_dims": list(args.decoder_dims),
        "other_model_arguments": "CellFlow defaults (deterministic condition encoder, "
        "attention_token pooling, cond_output_dropout 0.9, concatenation conditioning, "
        "match_linear epsilon 1, constant_noise 0, ema 1)",
        "perturbation_embedding": {
            "kang": "one-hot of 'treatment' (CellFlow's encoder)",
            "gene tasks": "gene_features.csv GO vector (64-d) per gene, two slots "
            "(gene_1, gene_2), zero vector for an empty slot",
        },
        "context_embedding": "sample covariate and split covariate 'context'; "
        "representation: mean PCA coordinates of the context's training control cells",
        "predict": "Tsit5, PIDController(rtol=1e-5, atol=1e-5) (CellFlow's defaults)",
        "validation": "none",
    }


def main(argv=None) -> None:
    parser = runner_parser(__doc__)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    parser.add_argument("--folds", nargs="*", type=int, help="only these fold numbers")
    parser.add_argument("--iterations", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--n-comps", type=int, default=50)
    parser.add_argument("--condition-embedding-dim", type=int, default=64)
    parser.add_argument("--time-freqs", type=int, default=64)
    parser.add_argument("--time-encoder-dims", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--decoder-dims", type=int, nargs="+", default=[512, 512])
    args = parser.parse_args(argv)
    pin_threads()
    settings = settings_from(args)
    for task in args.tasks:
        run_task(args.splits, args.preds, task, settings, args.seed, args.folds)


if __name__ == "__main__":
    main()

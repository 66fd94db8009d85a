"""Embedding benchmark: SCFM vs scVI vs PCA on Kang 2018 control PBMCs (8 donors).

Protocol
--------
Data: :func:`scfm_adapt.datasets.kang2018_ctrl` (12,261 cells x 1,287 genes, raw counts;
``obs["cluster_id"]``: 8 cell types, ``obs["sample_id"]``: 8 donors). Donors are sorted;
the last two are the *test donors* (``--test-donors``), the others the *train donors*.

Training: by default every model is trained on all cells without labels, as an embedding
model is used in practice (``--train-on all``). With ``--train-on train-donors`` the models
see only the train donors' cells and the test donors' cells are embedded afterwards as
queries. Both SCFM's and scVI's encoders ignore the batch, so a query cell is embedded
with a placeholder train donor as its batch (checked at run time: the embedding does not
change with the placeholder).

SCFM and scVI get the same budget: ``--max-epochs`` for scVI and for SCFM's stage 1 (token
VAE), ``--max-epochs-prior`` for SCFM's stage 2 (DiT prior), early stopping on the
validation ELBO with the same patience, batch size 128 and the same split of the training
cells: 80% train, 10% validation, 10% test (``train_size=0.8, validation_size=0.1``).
Both use scvi-tools' ``DataSplitter`` seeded from ``scvi.settings.seed``, which is set to
``--seed`` before each model; the script asserts that both hold out the same test cells.
Otherwise each model runs its default configuration (scVI with ``n_latent=10``).

Every model runs in its own fresh subprocess, one after another, so that wall times are
not disturbed and the peak RSS (``ru_maxrss``) of a process belongs to one model.

Metrics
-------
kNN accuracy / macro-F1
    ``KNeighborsClassifier(k=15)`` fit on the train donors' embeddings and ``cluster_id``,
    scored on the test donors' cells (label transfer across donors).
Donor mixing
    Within-cell-type kNN entropy of donor labels, ``k=50``, normalised to [0, 1] (1 =
    every neighbourhood holds all donors equally), averaged over cells, then over cell
    types; see :func:`scfm_adapt.metrics.batch_mixing_entropy`. Read it together with kNN accuracy:
    mixing alone rewards erasing biology.
Held-out NLL
    ``get_reconstruction_error(indices=model.test_indices)``: mean negative log-likelihood
    of a test cell's counts (nats per cell, one posterior sample, scvi-tools' definition),
    on the 10% test cells. Not defined for PCA.
Training throughput
    ``epochs actually run x n_train_cells / wall time of train()`` in cells/s (the wall time
    includes validation). For SCFM per stage and for both stages together (total
    cell-epochs / total wall time), with the ratio to scVI.
Peak memory
    Peak RSS of the model's process right after training (MiB), and
    ``torch.cuda.max_memory_allocated`` during training on a GPU.

Targets: kNN accuracy SCFM >= scVI; SCFM training throughput (both stages) >= 0.3x scVI.

Usage::

    python benchmarks/embedding.py                      # full run (long on a CPU)
    python benchmarks/embedding.py --max-epochs 1 --max-epochs-prior 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    donor_split,
    environment_info,
    fmt,
    markdown_table,
    pass_fail,
    peak_rss_mib,
    quiet,
    run_isolated,
    throughput,
    timer,
    track_peak_memory,
    write_json,
)
from scfm_adapt.baselines import lognorm_genes, pca_embedding
from scfm_adapt.metrics import batch_mixing_entropy, knn_transfer, label_clustering

DATASET = "kang2018_ctrl_8donors"
LABELS_KEY, BATCH_KEY = "cluster_id", "sample_id"
MODELS = ("scfm", "scvi", "pca", "lognorm")
DISPLAY = {
    "scfm": "SCFM",
    "scvi": "scVI",
    "pca": "PCA (log-norm, 50 PCs)",
    "lognorm": "log-norm genes",
}
TRAIN_SIZE, VALIDATION_SIZE = 0.8, 0.1
KNN_TARGET_MODEL, THROUGHPUT_TARGET = "scvi", 0.3
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "embedding.json"


@dataclass
class Config:
    """Everything a run depends on; written to the JSON and read by the workers."""

    models: list[str] = field(default_factory=lambda: list(MODELS))
    test_donors: list[str] | None = None
    train_on: str = "all"
    max_epochs: int = 100
    max_epochs_prior: int = 100
    patience: int = 20
    batch_size: int = 128
    precision: str = "32"
    accelerator: str = "auto"
    threads: int = os.cpu_count() or 1
    seed: int = 0
    knn_k: int = 15
    mixing_k: int = 50
    n_pcs: int = 50
    n_top_genes: int = 2000
    scfm_kwargs: dict = field(default_factory=dict)


# =========================================================================== data
def load_data(cfg: Config) -> tuple[Any, np.ndarray, list[str], list[str]]:
    """Load the data and split donors.

    Returns
    -------
    ``(adata, train_mask, train_donors, test_donors)``: ``train_mask`` marks the cells the
    models are trained on (all cells, or the train donors' cells).
    """
    import scfm_adapt as sfa

    adata = sfa.datasets.kang2018_ctrl()
    donors = adata.obs[BATCH_KEY].astype(str).to_numpy()
    train_donors, test_donors = donor_split(donors, cfg.test_donors)
    if cfg.train_on == "all":
        train_mask = np.ones(adata.n_obs, bool)
    else:
        train_mask = np.isin(donors, train_donors)
    return adata, train_mask, train_donors, test_donors


# =========================================================================== workers
def _log(msg: str) -> None:
    print(f"[embedding] {msg}", file=sys.stderr, flush=True)


def _train_kwargs(cfg: Config) -> dict[str, Any]:
    """Training arguments shared by SCFM and scVI (same budget and split)."""
    return {
        "max_epochs": cfg.max_epochs,
        "train_size": TRAIN_SIZE,
        "validation_size": VALIDATION_SIZE,
        "batch_size": cfg.batch_size,
        "early_stopping": True,
        "early_stopping_patience": cfg.patience,
        "accelerator": cfg.accelerator,
        "enable_progress_bar": False,
    }


def _with_batch(adata: Any, value: Any, dtype: Any) -> Any:
    """A copy of ``adata`` whose every cell has batch ``value``."""
    import pandas as pd

    out = adata.copy()
    out.obs[BATCH_KEY] = pd.Series(value, index=out.obs_names).astype(dtype)
    return out


def _embed_all(model: Any, adata: Any, train_mask: np.ndarray) -> np.ndarray:
    """Embed every cell of ``adata``; cells outside ``train_mask`` as queries.

    Query cells come from donors the model never saw, so they get a placeholder train
    donor as batch. That is only valid because the encoder ignores the batch, which is
    checked on a few cells with two different placeholders.
    """
    train_emb = model.get_latent_representation()
    emb = np.empty((adata.n_obs, train_emb.shape[1]), np.float32)
    emb[train_mask] = train_emb
    if train_mask.all():
        return emb
    dtype = model.adata.obs[BATCH_KEY].dtype
    known = model.adata.obs[BATCH_KEY].unique()
    query = adata[~train_mask]
    emb[~train_mask] = model.get_latent_representation(_with_batch(query, known[0], dtype))
    if len(known) > 1:
        probe = query[: min(64, query.n_obs)]
        other = model.get_latent_representation(_with_batch(probe, known[1], dtype))
        if not np.allclose(other, emb[~train_mask][: probe.n_obs], atol=1e-5):
            raise RuntimeError(
                "The encoder depends on the batch, so query donors cannot be embedded "
                "with a placeholder batch; use --train-on all."
            )
    return emb


def _stage_record(
    stage: str, epochs: int, max_epochs: int, n_cells: int, seconds: float
) -> dict[str, Any]:
    return {
        "stage": stage,
        "epochs": epochs,
        "max_epochs": max_epochs,
        "n_train_cells": n_cells,
        "wall_s": seconds,
        "cells_per_s": throughput(epochs, n_cells, seconds),
        "peak_rss_mib": peak_rss_mib(),
    }


def _n_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def fit_scfm(cfg: Config, adata: Any, train_mask: np.ndarray) -> tuple[np.ndarray, dict]:
    """Train SCFM (stage 1, then stage 2) with its default configuration."""
    import scvi

    import scfm_adapt as sfa

    scvi.settings.seed = cfg.seed
    adata_train = adata[train_mask].copy()
    sfa.model.SCFM.setup_anndata(adata_train, batch_key=BATCH_KEY)
    model = sfa.model.SCFM(adata_train, **cfg.scfm_kwargs)
    kwargs = {**_train_kwargs(cfg), "precision": cfg.precision}
    stages, test_indices = [], []
    with track_peak_memory() as mem:
        for stage, max_epochs in (("vae", cfg.max_epochs), ("prior", cfg.max_epochs_prior)):
            _log(f"SCFM: training stage {stage!r} (max {max_epochs} epochs)")
            kwargs.update(max_epochs=max_epochs, max_epochs_prior=max_epochs)
            with timer() as t:
                model.train(stage=stage, **kwargs)
            epochs = len(model.history[stage]["elbo_train"])
            n_cells = len(model.train_indices)
            stages.append(_stage_record(stage, epochs, max_epochs, n_cells, t["seconds"]))
            test_indices.append(np.asarray(model.test_indices))
    if not np.array_equal(*test_indices):
        raise RuntimeError("SCFM's two stages held out different test cells.")
    nll = model.get_reconstruction_error(indices=test_indices[0])["reconstruction_loss"]
    emb = _embed_all(model, adata, train_mask)
    return emb, {
        "summary": str(model),
        "n_params": _n_params(model.module),
        "device": str(model.device),
        "precision": cfg.precision,
        "stages": stages,
        "memory": mem,
        "test_indices": test_indices[0].tolist(),
        "heldout_nll": float(nll),
    }


def fit_scvi(cfg: Config, adata: Any, train_mask: np.ndarray) -> tuple[np.ndarray, dict]:
    """Train scVI with its default configuration and ``n_latent=10``."""
    import scvi

    scvi.settings.seed = cfg.seed
    adata_train = adata[train_mask].copy()
    scvi.model.SCVI.setup_anndata(adata_train, batch_key=BATCH_KEY)
    model = scvi.model.SCVI(adata_train, n_latent=10)
    _log(f"scVI: training (max {cfg.max_epochs} epochs)")
    with track_peak_memory() as mem, timer() as t:
        model.train(**_train_kwargs(cfg))
    epochs = len(model.history["elbo_train"])
    stage = _stage_record("scvi", epochs, cfg.max_epochs, len(model.train_indices), t["seconds"])
    test_indices = np.asarray(model.test_indices)
    nll = model.get_reconstruction_error(indices=test_indices)["reconstruction_loss"]
    emb = _embed_all(model, adata, train_mask)
    return emb, {
        "summary": f"scVI {scvi.__version__}, defaults with n_latent=10",
        "n_params": _n_params(model.module),
        "device": str(model.device),
        "precision": "32",
        "stages": [stage],
        "memory": mem,
        "test_indices": test_indices.tolist(),
        "heldout_nll": float(nll),
    }


def _fit_baseline(
    cfg: Config, adata: Any, train_mask: np.ndarray, n_comps: int | None
) -> tuple[np.ndarray, dict]:
    with track_peak_memory() as mem, timer() as t:
        if n_comps is None:
            emb = lognorm_genes(adata)
        else:
            emb = pca_embedding(adata, train_mask, n_comps, cfg.n_top_genes, cfg.seed)
    return emb, {
        "summary": "normalize_total(1e4) + log1p" + ("" if n_comps is None else " + HVG + PCA"),
        "n_params": None,
        "device": "cpu",
        "precision": None,
        "stages": [],
        "fit_wall_s": t["seconds"],
        "memory": mem,
        "test_indices": None,
        "heldout_nll": None,
    }


def fit_pca(cfg: Config, adata: Any, train_mask: np.ndarray) -> tuple[np.ndarray, dict]:
    """Log-normalised top-variable genes (all 1,287 here), PCA fit on the training cells."""
    return _fit_baseline(cfg, adata, train_mask, cfg.n_pcs)


def fit_lognorm(cfg: Config, adata: Any, train_mask: np.ndarray) -> tuple[np.ndarray, dict]:
    """The log-normalised genes themselves, as an embedding."""
    return _fit_baseline(cfg, adata, train_mask, None)


FITTERS = {"scfm": fit_scfm, "scvi": fit_scvi, "pca": fit_pca, "lognorm": fit_lognorm}


def run_worker(name: str, workdir: Path) -> None:
    """Fit one model in this (fresh) process; write ``<name>.npy`` and ``<name>.json``."""
    import torch

    cfg = Config(**json.loads((workdir / "config.json").read_text()))
    torch.set_num_threads(cfg.threads)
    quiet()
    adata, train_mask, _, _ = load_data(cfg)
    emb, record = FITTERS[name](cfg, adata, train_mask)
    record.update(
        name=name,
        embedding_dim=int(emb.shape[1]),
        n_train_cells=int(train_mask.sum()),
        environment=environment_info(),
    )
    np.save(workdir / f"{name}.npy", emb)
    write_json(workdir / f"{name}.json", record)


# =========================================================================== evaluation
def evaluate(
    emb: np.ndarray, adata: Any, train_donors: list[str], test_donors: list[str], cfg: Config
) -> dict[str, Any]:
    """Label transfer across donors and donor mixing of one embedding."""
    donors = adata.obs[BATCH_KEY].astype(str).to_numpy()
    labels = adata.obs[LABELS_KEY].astype(str).to_numpy()
    ref, query = np.isin(donors, train_donors), np.isin(donors, test_donors)
    knn = knn_transfer(emb[ref], labels[ref], emb[query], labels[query], k=cfg.knn_k)
    mixing = batch_mixing_entropy(emb, donors, labels, k=cfg.mixing_k)
    clusters = label_clustering(emb[query], labels[query], seed=cfg.seed)
    return {"knn": knn, "mixing": mixing, "clusters": clusters}


def _training_summary(record: dict[str, Any]) -> dict[str, Any]:
    """Epochs, wall time and throughput of all stages of one model together."""
    stages = record["stages"]
    if not stages:
        return {"epochs": None, "wall_s": record.get("fit_wall_s"), "cells_per_s": None}
    wall = sum(s["wall_s"] for s in stages)
    cell_epochs = sum(s["epochs"] * s["n_train_cells"] for s in stages)
    return {
        "epochs": "+".join(str(s["epochs"]) for s in stages),
        "wall_s": wall,
        "cells_per_s": cell_epochs / wall if wall > 0 else float("nan"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build_report(
    cfg: Config,
    records: dict[str, dict[str, Any]],
    metrics: dict[str, dict[str, Any]],
    data: dict[str, Any],
) -> dict[str, Any]:
    """Collect the rows, the throughput breakdown and the target checks."""
    scvi_rate = None
    if "scvi" in records:
        scvi_rate = records["scvi"]["stages"][0]["cells_per_s"]
    rows = []
    for name, rec in records.items():
        train = _training_summary(rec)
        rows.append(
            {
                "model": name,
                "display": DISPLAY[name],
                "embedding_dim": rec["embedding_dim"],
                "knn_accuracy": metrics[name]["knn"]["accuracy"],
                "knn_macro_f1": metrics[name]["knn"]["macro_f1"],
                "donor_mixing": metrics[name]["mixing"]["score"],
                **metrics[name]["clusters"],
                "donor_mixing_per_cell_type": metrics[name]["mixing"]["per_group"],
                "heldout_nll": rec["heldout_nll"],
                "epochs": train["epochs"],
                "train_wall_s": train["wall_s"],
                "train_cells_per_s": train["cells_per_s"],
                "throughput_vs_scvi": _ratio(train["cells_per_s"], scvi_rate),
                "peak_rss_mib": rec["memory"]["peak_rss_mib"],
                "rss_before_train_mib": rec["memory"]["rss_before_mib"],
                "cuda_peak_mib": rec["memory"]["cuda_peak_mib"],
                "n_params": rec["n_params"],
                "device": rec["device"],
                "precision": rec["precision"],
                "summary": rec["summary"],
            }
        )

    stage_names = {"scvi": "scVI", "vae": "SCFM stage 1 (VAE)", "prior": "SCFM stage 2 (DiT)"}
    stages = [
        {**s, "display": stage_names[s["stage"]], "vs_scvi": _ratio(s["cells_per_s"], scvi_rate)}
        for name in ("scvi", "scfm")
        if name in records
        for s in records[name]["stages"]
    ]
    if "scfm" in records:
        rec, train = records["scfm"], _training_summary(records["scfm"])
        stages.append(
            {
                "stage": "both",
                "display": "SCFM both stages",
                "epochs": train["epochs"],
                "max_epochs": f"{cfg.max_epochs}+{cfg.max_epochs_prior}",
                "n_train_cells": rec["stages"][0]["n_train_cells"],
                "wall_s": train["wall_s"],
                "cells_per_s": train["cells_per_s"],
                "peak_rss_mib": rec["memory"]["peak_rss_mib"],
                "vs_scvi": _ratio(train["cells_per_s"], scvi_rate),
            }
        )

    targets: dict[str, Any] = {}
    if "scfm" in records and "scvi" in records:
        acc = {m: metrics[m]["knn"]["accuracy"] for m in ("scfm", "scvi")}
        both = next(s for s in stages if s["stage"] == "both")["vs_scvi"]
        stage1 = next(s for s in stages if s["stage"] == "vae")["vs_scvi"]
        targets = {
            "knn_accuracy_scfm_ge_scvi": {
                "pass": acc["scfm"] >= acc["scvi"],
                "scfm": acc["scfm"],
                "scvi": acc["scvi"],
            },
            "throughput_scfm_ge_0.3x_scvi": {
                "pass": both is not None and both >= THROUGHPUT_TARGET,
                "ratio_both_stages": both,
                "ratio_stage1": stage1,
                "threshold": THROUGHPUT_TARGET,
            },
        }
    env = next(iter(records.values()))["environment"] if records else {}
    env = {
        **env,
        "device": next((r["device"] for r in records.values() if r["device"] != "cpu"), "cpu"),
    }
    return {
        "benchmark": "embedding",
        "dataset": DATASET,
        "config": asdict(cfg),
        "data": data,
        "environment": env,
        "results": rows,
        "throughput": stages,
        "targets": targets,
        "scfm_summary": records.get("scfm", {}).get("summary"),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown: environment, data, results, throughput and targets."""
    env, data, cfg = report["environment"], report["data"], report["config"]
    lines = [
        f"## Embedding benchmark: {report['dataset']}",
        "",
        f"Environment: torch {env.get('torch')} | device {env.get('device')}"
        f"{' (' + env['cuda_device'] + ')' if env.get('cuda_device') else ''} | "
        f"threads {env.get('torch_threads')} | CPU {env.get('cpu_model')} "
        f"({env.get('cpu_count')} cores) | scvi-tools {env.get('scvi')} | "
        f"scfm_adapt {env.get('scfm_adapt')}",
        f"Data: {data['n_cells']:,} cells x {data['n_genes']:,} genes; train donors "
        f"{', '.join(data['train_donors'])} ({data['n_ref_cells']:,} cells) | test donors "
        f"{', '.join(data['test_donors'])} ({data['n_query_cells']:,} cells)",
        f"Training: on {cfg['train_on']} ({data['n_train_cells']:,} cells; split "
        f"{TRAIN_SIZE:.0%}/{VALIDATION_SIZE:.0%}/{1 - TRAIN_SIZE - VALIDATION_SIZE:.0%} "
        f"train/val/test, {fmt(data['n_test_cells'], ',d')} test cells for the NLL) | max epochs "
        f"{cfg['max_epochs']} (scVI, SCFM stage 1) + {cfg['max_epochs_prior']} (SCFM stage 2) "
        f"| early stopping patience {cfg['patience']} | batch {cfg['batch_size']} | SCFM "
        f"precision {cfg['precision']} | seed {cfg['seed']}",
        "",
    ]
    headers = [
        "Model",
        "dim",
        f"kNN acc (k={cfg['knn_k']})",
        "kNN macro-F1",
        "k-means NMI",
        "k-means ARI",
        "silhouette",
        f"donor mixing (k={cfg['mixing_k']})",
        "held-out NLL",
        "epochs",
        "train s",
        "cells/s",
        "x scVI",
        "peak RSS MiB",
    ]
    rows = [
        [
            r["display"],
            str(r["embedding_dim"]),
            fmt(r["knn_accuracy"]),
            fmt(r["knn_macro_f1"]),
            fmt(r["kmeans_nmi"]),
            fmt(r["kmeans_ari"]),
            fmt(r["silhouette_label"]),
            fmt(r["donor_mixing"]),
            fmt(r["heldout_nll"], ".1f"),
            fmt(r["epochs"]),
            fmt(r["train_wall_s"], ".1f"),
            fmt(r["train_cells_per_s"], ",.0f"),
            fmt(r["throughput_vs_scvi"], ".2f", "x"),
            fmt(r["peak_rss_mib"], ",.0f"),
        ]
        for r in report["results"]
    ]
    lines += [markdown_table(headers, rows), ""]
    if any(r["cuda_peak_mib"] is not None for r in report["results"]):
        lines += [
            "CUDA peak allocated (MiB): "
            + ", ".join(
                f"{r['display']} {fmt(r['cuda_peak_mib'], ',.0f')}" for r in report["results"]
            ),
            "",
        ]
    if report["throughput"]:
        headers = [
            "Training",
            "epochs run / max",
            "train cells",
            "wall s",
            "cells/s",
            "x scVI",
            "peak RSS MiB",
        ]
        rows = [
            [
                s["display"],
                f"{s['epochs']} / {s['max_epochs']}",
                f"{s['n_train_cells']:,}",
                fmt(s["wall_s"], ".1f"),
                fmt(s["cells_per_s"], ",.0f"),
                fmt(s["vs_scvi"], ".2f", "x"),
                fmt(s["peak_rss_mib"], ",.0f"),
            ]
            for s in report["throughput"]
        ]
        lines += [markdown_table(headers, rows), ""]
    mixing_ref = report["data"].get("donor_mixing_reference")
    lines += [
        f"Donor mixing of a perfectly mixed embedding (donor composition per cell type): "
        f"{fmt(mixing_ref)}",
        "",
    ]
    t = report["targets"]
    if t:
        knn, thr = t["knn_accuracy_scfm_ge_scvi"], t["throughput_scfm_ge_0.3x_scvi"]
        lines += [
            "Targets:",
            f"- kNN accuracy SCFM >= scVI: {pass_fail(knn['pass'])} "
            f"({knn['scfm']:.3f} vs {knn['scvi']:.3f})",
            f"- SCFM training throughput >= {thr['threshold']}x scVI: {pass_fail(thr['pass'])} "
            f"(both stages {fmt(thr['ratio_both_stages'], '.2f', 'x')}; "
            f"stage 1 only {fmt(thr['ratio_stage1'], '.2f', 'x')})",
        ]
    else:
        lines.append("Targets: skipped (need both scfm and scvi in --models)")
    return "\n".join(lines)


# =========================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``)."""
    d = Config()
    p = argparse.ArgumentParser(
        description="Compare SCFM, scVI and PCA embeddings on Kang 2018 control PBMCs "
        "(kNN label transfer across donors, donor mixing, held-out NLL, throughput, memory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--models",
        default=",".join(d.models),
        help=f"comma-separated subset of {', '.join(MODELS)}",
    )
    p.add_argument(
        "--test-donors",
        default=None,
        help="comma-separated test donors; None means the last 2 sorted donors",
    )
    p.add_argument(
        "--train-on",
        choices=("all", "train-donors"),
        default=d.train_on,
        help="train on all cells, or only on the train donors' cells (the test "
        "donors are then embedded as queries)",
    )
    p.add_argument(
        "--max-epochs",
        type=int,
        default=d.max_epochs,
        help="max epochs of scVI and of SCFM's stage 1 (VAE)",
    )
    p.add_argument(
        "--max-epochs-prior",
        type=int,
        default=d.max_epochs_prior,
        help="max epochs of SCFM's stage 2 (DiT prior)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="early-stopping patience (epochs) of both models",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--scfm-kwargs",
        type=json.loads,
        default={},
        help="JSON of SCFM constructor arguments, e.g. '{\"encoder_rank\": null}'",
    )
    p.add_argument(
        "--precision",
        default=d.precision,
        help="Lightning precision of SCFM's training, e.g. 32 or bf16-mixed "
        "(scVI trains at its default, 32)",
    )
    p.add_argument("--accelerator", default=d.accelerator, help="Lightning accelerator")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """Validate the arguments into a :class:`Config`."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    test_donors = None
    if args.test_donors:
        test_donors = [s.strip() for s in args.test_donors.split(",") if s.strip()]
    return Config(
        models=models,
        test_donors=test_donors,
        train_on=args.train_on,
        max_epochs=args.max_epochs,
        max_epochs_prior=args.max_epochs_prior,
        patience=args.patience,
        batch_size=args.batch_size,
        precision=args.precision,
        accelerator=args.accelerator,
        threads=args.threads,
        seed=args.seed,
        scfm_kwargs=args.scfm_kwargs,
    )


def main(argv: list[str] | None = None) -> int:
    """Run every model in its own subprocess, evaluate, print and write the report."""
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.workdir)
        return 0
    cfg = config_from_args(args)
    adata, train_mask, train_donors, test_donors = load_data(cfg)  # fail fast on bad args

    records: dict[str, dict[str, Any]] = {}
    embeddings: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="scfm_embedding_") as tmp:
        workdir = Path(tmp)
        write_json(workdir / "config.json", asdict(cfg))
        for i, name in enumerate(cfg.models, 1):
            _log(f"({i}/{len(cfg.models)}) {DISPLAY[name]} in a fresh process")
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                name,
                "--workdir",
                str(workdir),
            ]
            records[name] = run_isolated(cmd, workdir / f"{name}.json")
            embeddings[name] = np.load(workdir / f"{name}.npy")

    if "scfm" in records and "scvi" in records:
        a, b = records["scfm"]["test_indices"], records["scvi"]["test_indices"]
        assert a == b, "SCFM and scVI held out different test cells"
    _log("evaluating embeddings")
    metrics = {
        name: evaluate(emb, adata, train_donors, test_donors, cfg)
        for name, emb in embeddings.items()
    }
    donors = adata.obs[BATCH_KEY].astype(str).to_numpy()
    test_idx = next((r["test_indices"] for r in records.values() if r["test_indices"]), None)
    data = {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "train_donors": train_donors,
        "test_donors": test_donors,
        "n_ref_cells": int(np.isin(donors, train_donors).sum()),
        "n_query_cells": int(np.isin(donors, test_donors).sum()),
        "n_train_cells": int(train_mask.sum()),
        "n_test_cells": None if test_idx is None else len(test_idx),
        "same_test_cells_scfm_scvi": "scfm" in records and "scvi" in records,
        "donor_mixing_reference": next(iter(metrics.values()))["mixing"]["reference"],
    }
    report = build_report(cfg, records, metrics, data)
    print(format_report(report))
    write_json(args.out, report)
    # The embeddings themselves, for scIB's metrics in their own environment
    # (benchmarks/scib_runner.py).
    np.savez_compressed(
        Path(args.out).with_suffix(".npz"),
        # Fixed-width strings, not objects: the file then loads without pickle.
        labels=adata.obs[LABELS_KEY].to_numpy().astype(str),
        batches=np.asarray(donors).astype(str),
        **{f"embedding_{name}": emb for name, emb in embeddings.items()},
    )
    _log(f"wrote {args.out} and its embeddings (.npz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

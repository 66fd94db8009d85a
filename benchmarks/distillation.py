"""Distillation benchmark: a small student SCFM against its teacher, on Kang 2018 control PBMCs.

Protocol
--------
Data: :func:`scfm_adapt.datasets.kang2018_ctrl` (12,261 cells x 1,287 genes, raw counts;
``obs["cluster_id"]``: 8 cell types, ``obs["sample_id"]``: 8 donors, used as the batch).
Donors are sorted; the last two are the *test donors* (``--test-donors``). As in
``embedding.py``, the models train on all cells without labels, with scvi-tools'
``DataSplitter`` split 80% train / 10% validation / 10% test (seeded by ``--seed``).

Three models, each for at most ``--max-epochs`` epochs (early stopping on the validation loss
with ``--patience``), batch size 128, learning rate 1e-3:

teacher
    :class:`~scfm_adapt.model.SCFM` with its default sizes, VAE stage only.
student
    :func:`scfm_adapt.model.distill` of the teacher (encoder width ``--encoder-hidden``,
    depth ``--encoder-depth``, decoder width ``--decoder-hidden``; default loss weights);
    it reuses the teacher's train / validation / test cells.
scratch
    An SCFM of the student's sizes trained as an ordinary VAE, without the teacher, on the
    same split (checked) for the same number of epochs.

Metrics
-------
Parameters
    Of the VAE (encoder, decoder, dispersion: what embedding and decoding use) and of the
    encoder alone. The untrained DiT prior, the same for all three, is not counted.
Encode throughput
    Cells per second of ``get_latent_representation`` on all cells (batch 128, including
    scvi-tools' data loading), median of ``--repeats`` timed runs after one warm-up run,
    with torch set to 1 and to 2 threads.
Held-out NLL
    ``get_reconstruction_error(indices=test cells)``: mean negative log-likelihood of the
    counts per cell (one posterior sample), on the 10% test cells.
kNN accuracy / macro-F1
    ``KNeighborsClassifier(k=15)`` fit on the train donors' embeddings (posterior mean,
    pooled over tokens) and ``cluster_id``, scored on the test donors' cells.
Latent R² vs teacher
    On the test cells, ``1 - sum (mu - mu_teacher)^2 / sum (mu_teacher - mean)^2`` over all
    token coordinates (direct agreement: what reusing the teacher's DiT prior needs), and
    the same after the least-squares affine map from the model's tokens to the teacher's fit
    on the training cells (how much of the teacher's latent the model encodes at all).

Timings are only comparable on an otherwise idle machine; training runs with ``--threads``
torch threads.

Usage::

    python benchmarks/distillation.py                   # 40 epochs per model
    python benchmarks/distillation.py --max-epochs 1    # smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    donor_split,
    environment_info,
    fmt,
    markdown_table,
    quiet,
    throughput,
    timer,
    write_json,
)
from scfm_adapt.metrics import knn_transfer

DATASET = "kang2018_ctrl_8donors"
LABELS_KEY, BATCH_KEY = "cluster_id", "sample_id"
TRAIN_SIZE, VALIDATION_SIZE = 0.8, 0.1
MODELS = ("teacher", "student", "scratch")
DISPLAY = {
    "teacher": "teacher (SCFM defaults)",
    "student": "student (distilled)",
    "scratch": "same size, from scratch",
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "distillation.json"


@dataclass
class Config:
    """Everything a run depends on; written to the JSON report."""

    max_epochs: int = 40
    patience: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    encoder_hidden: int = 32
    encoder_depth: int = 1
    decoder_hidden: int = 128
    test_donors: list[str] | None = None
    threads: int = 1
    encode_threads: tuple[int, ...] = (1, 2)
    repeats: int = 3
    accelerator: str = "cpu"
    seed: int = 0
    knn_k: int = 15


def _log(msg: str) -> None:
    print(f"[distillation] {msg}", file=sys.stderr, flush=True)


# =========================================================================== training
def _fit_kwargs(cfg: Config) -> dict[str, Any]:
    return {
        "max_epochs": cfg.max_epochs,
        "batch_size": cfg.batch_size,
        "early_stopping": True,
        "early_stopping_patience": cfg.patience,
        "accelerator": cfg.accelerator,
        "enable_progress_bar": False,
    }


def _student_sizes(cfg: Config) -> dict[str, int]:
    return {
        "encoder_hidden": cfg.encoder_hidden,
        "encoder_depth": cfg.encoder_depth,
        "decoder_hidden": cfg.decoder_hidden,
    }


def _train_vae(cfg: Config, adata: Any, **sizes: int) -> tuple[Any, float]:
    """An SCFM of the given sizes, VAE stage trained on the 80/10/10 split; and its wall time."""
    import scvi

    import scfm_adapt as sfa

    scvi.settings.seed = cfg.seed
    model = sfa.model.SCFM(adata, **sizes)
    with timer() as t:
        model.train(
            stage="vae",
            train_size=TRAIN_SIZE,
            validation_size=VALIDATION_SIZE,
            lr=cfg.lr,
            **_fit_kwargs(cfg),
        )
    return model, t["seconds"]


def _distil(cfg: Config, teacher: Any) -> tuple[Any, float]:
    import scvi

    import scfm_adapt as sfa

    scvi.settings.seed = cfg.seed
    with timer() as t:
        student = sfa.model.distill(teacher, lr=cfg.lr, **_student_sizes(cfg), **_fit_kwargs(cfg))
    return student, t["seconds"]


# =========================================================================== metrics
def vae_parameters(model: Any) -> dict[str, int]:
    """Parameters of the encoder and of the whole VAE (encoder, decoder, dispersion)."""
    m = model.module
    encoder = sum(p.numel() for p in m.encoder.parameters())
    decoder = sum(p.numel() for p in m.decoder.parameters())
    return {"encoder": encoder, "vae": encoder + decoder + m.px_r.numel()}


def encode_throughput(model: Any, adata: Any, threads: int, repeats: int) -> dict[str, Any]:
    """Median cells/s of ``get_latent_representation(adata)`` with ``threads`` torch threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.get_latent_representation(adata)  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.get_latent_representation(adata)
            seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    med = statistics.median(seconds)
    return {"threads": threads, "seconds": seconds, "cells_per_s": adata.n_obs / med}


def latent_agreement(
    tokens: np.ndarray, teacher_tokens: np.ndarray, fit_idx: np.ndarray, test_idx: np.ndarray
) -> dict[str, float]:
    """R² of the teacher's tokens on ``test_idx``: direct, and after an affine map.

    Parameters
    ----------
    tokens, teacher_tokens
        Posterior means ``(n_cells, n_tokens, token_dim)`` of a model and of the teacher.
    fit_idx, test_idx
        Cells to fit the affine map on, and cells to score.

    Returns
    -------
    ``{"r2": ..., "r2_affine": ...}``.
    """
    x = tokens.reshape(len(tokens), -1).astype(np.float64)
    y = teacher_tokens.reshape(len(teacher_tokens), -1).astype(np.float64)
    y_test = y[test_idx]
    sst = ((y_test - y_test.mean(0)) ** 2).sum()

    def r2(pred: np.ndarray) -> float:
        return float(1 - ((pred - y_test) ** 2).sum() / sst)

    design = np.c_[x, np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(design[fit_idx], y[fit_idx], rcond=None)
    return {"r2": r2(x[test_idx]), "r2_affine": r2(design[test_idx] @ coef)}


def evaluate(
    name: str,
    model: Any,
    adata: Any,
    teacher_tokens: np.ndarray | None,
    cfg: Config,
    train_donors: list[str],
    test_donors: list[str],
) -> tuple[dict[str, Any], np.ndarray]:
    """Every metric of one trained model; also returns its tokens (posterior means)."""
    import scvi

    tokens = model.get_latent_representation(return_tokens=True)  # (N, T, d)
    emb = tokens.mean(1)
    donors = adata.obs[BATCH_KEY].astype(str).to_numpy()
    labels = adata.obs[LABELS_KEY].astype(str).to_numpy()
    ref, query = np.isin(donors, train_donors), np.isin(donors, test_donors)
    test_idx = np.asarray(model.test_indices)
    scvi.settings.seed = cfg.seed  # the NLL draws one posterior sample per cell
    nll = model.get_reconstruction_error(indices=test_idx)["reconstruction_loss"]
    record: dict[str, Any] = {
        "model": name,
        "display": DISPLAY[name],
        "summary": str(model),
        "params": vae_parameters(model),
        "heldout_nll": float(nll),
        "knn": knn_transfer(emb[ref], labels[ref], emb[query], labels[query], k=cfg.knn_k),
        "encode": [encode_throughput(model, adata, n, cfg.repeats) for n in cfg.encode_threads],
        "agreement": None,
        "test_indices": test_idx,
    }
    if teacher_tokens is not None:
        fit_idx = np.asarray(model.train_indices)
        record["agreement"] = latent_agreement(tokens, teacher_tokens, fit_idx, test_idx)
    return record, tokens


def _training_record(model: Any, seconds: float, history_key: str = "vae") -> dict[str, Any]:
    epochs = len(model.history[history_key]["elbo_train"])
    n = len(model.train_indices)
    return {
        "epochs": epochs,
        "wall_s": seconds,
        "n_train_cells": n,
        "cells_per_s": throughput(epochs, n, seconds),
    }


# =========================================================================== report
def format_report(report: dict[str, Any]) -> str:
    """The report as markdown: environment, data, the results table, notes."""
    env, data, cfg = report["environment"], report["data"], report["config"]
    rows_by_name = {r["model"]: r for r in report["results"]}
    teacher = rows_by_name["teacher"]
    lines = [
        f"## Distillation benchmark: {report['dataset']}",
        "",
        f"Environment: torch {env.get('torch')} | CPU {env.get('cpu_model')} "
        f"({env.get('cpu_count')} cores) | training threads {cfg['threads']} | "
        f"scvi-tools {env.get('scvi')} | scfm_adapt {env.get('scfm_adapt')}",
        f"Data: {data['n_cells']:,} cells x {data['n_genes']:,} genes; kNN reference = train "
        f"donors ({data['n_ref_cells']:,} cells), query = test donors "
        f"{', '.join(data['test_donors'])} ({data['n_query_cells']:,} cells); NLL and R² on "
        f"{data['n_test_cells']:,} held-out test cells",
        f"Training: max {cfg['max_epochs']} epochs, early stopping patience {cfg['patience']}, "
        f"batch {cfg['batch_size']}, lr {cfg['lr']}, seed {cfg['seed']}; student / scratch: "
        f"encoder width {cfg['encoder_hidden']} x {cfg['encoder_depth']} block(s), decoder "
        f"width {cfg['decoder_hidden']}",
        "",
    ]
    t1, t2 = cfg["encode_threads"][:2] if len(cfg["encode_threads"]) > 1 else (1, 1)
    headers = [
        "Model",
        "VAE params",
        "encoder params",
        "epochs",
        "train s",
        f"encode cells/s ({t1} thr)",
        f"encode cells/s ({t2} thr)",
        "held-out NLL",
        f"kNN acc (k={cfg['knn_k']})",
        "kNN macro-F1",
        "latent R² vs teacher",
        "R² after affine map",
    ]
    rows = []
    for r in report["results"]:
        enc = {e["threads"]: e["cells_per_s"] for e in r["encode"]}
        agree = r["agreement"] or {"r2": 1.0, "r2_affine": 1.0}
        speed = enc.get(t1) / {e["threads"]: e["cells_per_s"] for e in teacher["encode"]}[t1]
        rows.append(
            [
                r["display"],
                f"{r['params']['vae']:,} ({r['params']['vae'] / teacher['params']['vae']:.2f}x)",
                f"{r['params']['encoder']:,}",
                str(r["training"]["epochs"]),
                fmt(r["training"]["wall_s"], ".0f"),
                f"{fmt(enc.get(t1), ',.0f')} ({speed:.2f}x)",
                fmt(enc.get(t2), ",.0f"),
                fmt(r["heldout_nll"], ".1f"),
                fmt(r["knn"]["accuracy"]),
                fmt(r["knn"]["macro_f1"]),
                fmt(agree["r2"]),
                fmt(agree["r2_affine"]),
            ]
        )
    lines += [markdown_table(headers, rows), ""]
    load = ", ".join(
        f"{env[k][0]:.2f}" for k in ("loadavg_1_5_15_before", "loadavg_1_5_15_after") if k in env
    )
    lines.append(
        "In parentheses: relative to the teacher. Timings from one run; 1-minute load "
        f"average before / after the run: {load} (other processes share the CPU when it "
        "exceeds the training threads)."
    )
    return "\n".join(lines)


# =========================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``)."""
    d = Config()
    p = argparse.ArgumentParser(
        description="Distil an SCFM into a smaller student on Kang 2018 control PBMCs and "
        "compare size, encode speed and quality with the teacher and a same-size model "
        "trained from scratch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--encoder-hidden", type=int, default=d.encoder_hidden)
    p.add_argument("--encoder-depth", type=int, default=d.encoder_depth)
    p.add_argument("--decoder-hidden", type=int, default=d.decoder_hidden)
    p.add_argument("--test-donors", default=None, help="comma-separated; default last 2")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads for training")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed encode runs")
    p.add_argument("--accelerator", default=d.accelerator, help="Lightning accelerator")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train the teacher, the student and the scratch model; evaluate; print and write."""
    import torch

    import scfm_adapt as sfa

    args = parse_args(argv)
    cfg = Config(
        max_epochs=args.max_epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        encoder_hidden=args.encoder_hidden,
        encoder_depth=args.encoder_depth,
        decoder_hidden=args.decoder_hidden,
        test_donors=[s.strip() for s in args.test_donors.split(",")] if args.test_donors else None,
        threads=args.threads,
        repeats=args.repeats,
        accelerator=args.accelerator,
        seed=args.seed,
    )
    quiet()
    torch.set_num_threads(cfg.threads)
    load_before = os.getloadavg()
    adata = sfa.datasets.kang2018_ctrl()
    donors = adata.obs[BATCH_KEY].astype(str).to_numpy()
    train_donors, test_donors = donor_split(donors, cfg.test_donors)
    sfa.model.SCFM.setup_anndata(adata, batch_key=BATCH_KEY)

    _log(f"teacher: training the VAE (max {cfg.max_epochs} epochs)")
    teacher, t_teacher = _train_vae(cfg, adata)
    _log(f"student: distilling (max {cfg.max_epochs} epochs)")
    student, t_student = _distil(cfg, teacher)
    _log(f"scratch: training a student-size VAE (max {cfg.max_epochs} epochs)")
    scratch, t_scratch = _train_vae(cfg, adata, **_student_sizes(cfg))

    _log("evaluating")
    records, teacher_tokens = [], None
    for name, model, seconds in (
        ("teacher", teacher, t_teacher),
        ("student", student, t_student),
        ("scratch", scratch, t_scratch),
    ):
        rec, tokens = evaluate(name, model, adata, teacher_tokens, cfg, train_donors, test_donors)
        rec["training"] = _training_record(model, seconds)
        teacher_tokens = tokens if name == "teacher" else teacher_tokens
        records.append(rec)
    test_sets = [np.sort(r.pop("test_indices")) for r in records]
    if not all(np.array_equal(test_sets[0], t) for t in test_sets[1:]):
        raise RuntimeError("The three models held out different test cells.")

    report = {
        "benchmark": "distillation",
        "dataset": DATASET,
        "config": asdict(cfg),
        "data": {
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            "train_donors": train_donors,
            "test_donors": test_donors,
            "n_ref_cells": int(np.isin(donors, train_donors).sum()),
            "n_query_cells": int(np.isin(donors, test_donors).sum()),
            "n_test_cells": len(test_sets[0]),
        },
        "environment": {
            **environment_info(),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": os.getloadavg(),
        },
        "results": records,
    }
    print(format_report(report))
    write_json(args.out, report)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

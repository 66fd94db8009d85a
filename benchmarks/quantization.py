"""Quantization benchmark: float32 vs int8 dynamic quantization of SCFM on Kang 2018 PBMCs.

Protocol
--------
Data: :func:`scfm_adapt.datasets.kang2018_ctrl` (12,261 cells x 1,287 genes, raw counts;
``obs["cluster_id"]``: 8 cell types, ``obs["sample_id"]``: 8 donors). Donors are sorted;
the last two are the *test donors* (``--test-donors``), the others the *train donors*.

Training: SCFM (default sizes, ``batch_key="sample_id"``) trains its stage 1 (token VAE)
on the train donors' cells only, for ``--epochs`` epochs on every one of them
(``train_size=1.0``: no validation, no early stopping), batch size 128, seed ``--seed``.
The DiT prior is not trained: embedding and denoised expression read the VAE alone.
:meth:`SCFM.quantize` then gives the int8 copy (``torch.ao.quantization.quantize_dynamic``
on every ``nn.Linear``). Both models run on the CPU with ``torch.set_num_threads(--threads)``.

The test donors' cells are embedded as queries with a placeholder train donor as their
batch (the encoder ignores the batch; checked at run time, as in ``embedding.py``).

Metrics (float32 and int8, over all 12,261 cells)
-------------------------------------------------
Embedding cells/s
    ``n_cells / t`` with ``t`` the median wall time of ``--repeats`` calls of
    ``get_latent_representation`` over all cells (``batch_size=--batch-size``), after one
    untimed warm-up call; float32 and int8 calls alternate. Includes the data loader, as a
    user sees it.
Encoder-only cells/s
    The same for the module's encoder alone (``module.inference``) on batches loaded
    beforehand: the compute that quantization speeds up, without the data loader.
Expression cells/s
    The same for ``get_normalized_expression`` (median of 3 calls).
Checkpoint MiB
    Size of the module's serialised ``state_dict`` (``torch.save``), i.e. what a
    deployment ships; int8 weights are packed by PyTorch's quantized Linear.
Cosine (median, min), relative error
    Per-cell cosine similarity of the int8 and float embeddings, and
    ``||Z_int8 - Z_float||_F / ||Z_float||_F``.
kNN accuracy / macro-F1
    ``KNeighborsClassifier(k=15)`` fit on the train donors' embeddings and ``cluster_id``,
    scored on the test donors' cells (label transfer across donors), from each model's
    embedding; the row "float ref -> int8 query" fits on float embeddings of the train
    donors and scores int8 embeddings of the test donors (a quantized model mapping cells
    onto a reference embedded by the float model).
Expression Pearson r
    Pearson correlation of ``log`` normalized expression (library size 1), int8 vs float,
    over all cells x genes.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/quantization.py --threads 1          # ~5 min on a CPU
    python benchmarks/quantization.py --epochs 2                             # smoke test
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    donor_split,
    environment_info,
    fmt,
    markdown_table,
    quiet,
    timer,
    write_json,
)
from scfm_adapt.metrics import knn_transfer

DATASET = "kang2018_ctrl_8donors"
LABELS_KEY, BATCH_KEY = "cluster_id", "sample_id"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quantization.json"


def _log(msg: str) -> None:
    print(f"[quantization] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="SCFM float32 vs int8 dynamic quantization on Kang 2018 control PBMCs: "
        "embedding speed, checkpoint size, embedding agreement, kNN label transfer to "
        "held-out donors and denoised-expression agreement.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=30, help="epochs of SCFM's stage 1 (VAE)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (training and timing)")
    p.add_argument("--batch-size", type=int, default=1024, help="cells per inference batch")
    p.add_argument("--repeats", type=int, default=5, help="timed embedding calls (median)")
    p.add_argument(
        "--test-donors",
        default=None,
        help="comma-separated test donors; None means the last 2 sorted donors",
    )
    p.add_argument("--knn-k", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator for training")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    return p.parse_args(argv)


# =========================================================================== measurements
def _interleaved_seconds(
    calls: dict[str, dict[str, Any]], repeats: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Median wall time of each ``calls[model][what]()``, after one untimed warm-up call.

    The models take turns within each repeat, so that a slow spell of a shared machine
    slows both rather than one.
    """
    times: dict[str, dict[str, list[float]]] = {n: {w: [] for w in repeats} for n in calls}
    for what, n_rep in repeats.items():
        for fns in calls.values():
            fns[what]()  # warm-up: registry lookups, allocator, one-time kernel setup
        for _ in range(n_rep):
            for name, fns in calls.items():
                with timer() as t:
                    fns[what]()
                times[name][what].append(t["seconds"])
    return {n: {w: float(np.median(v)) for w, v in ts.items()} for n, ts in times.items()}


def _checkpoint_mib(module: Any) -> float:
    import torch

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes / 1024**2


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _log_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of the logs (``scfm_adapt.metrics``' Pearson on log values)."""
    from scfm_adapt.metrics._perturbation import _pearson

    return _pearson(np.log(a.astype(np.float64)).ravel(), np.log(b.astype(np.float64)).ravel())


def _with_batch(adata: Any, values: Any, donors: list[str]) -> Any:
    """A copy of ``adata`` whose batch column is ``values`` (categories: ``donors``)."""
    import pandas as pd

    out = adata.copy()
    out.obs[BATCH_KEY] = pd.Categorical(np.broadcast_to(values, out.n_obs), categories=donors)
    return out


def _check_batch_free(model: Any, query: Any, donors: list[str]) -> None:
    """The encoder must ignore the batch for placeholder donors to be valid."""
    if len(donors) < 2:
        return
    probe = query[: min(64, query.n_obs)]
    a, b = (model.get_latent_representation(_with_batch(probe, d, donors)) for d in donors[:2])
    if not np.allclose(a, b, atol=1e-5):
        raise RuntimeError("The encoder depends on the batch: query donors cannot be embedded.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, quantize and measure; returns the report."""
    import scvi
    import torch

    import scfm_adapt as sfa

    torch.set_num_threads(args.threads)
    quiet()
    adata = sfa.datasets.kang2018_ctrl()
    adata.obs[BATCH_KEY] = adata.obs[BATCH_KEY].astype(str).astype("category")
    donors = adata.obs[BATCH_KEY].to_numpy().astype(str)
    test_donors = [s.strip() for s in args.test_donors.split(",")] if args.test_donors else None
    train_donors, test_donors = donor_split(donors, test_donors)
    train_mask = np.isin(donors, train_donors)
    labels = adata.obs[LABELS_KEY].astype(str).to_numpy()

    scvi.settings.seed = args.seed
    adata_train = adata[train_mask].copy()
    adata_train.obs[BATCH_KEY] = adata_train.obs[BATCH_KEY].cat.set_categories(train_donors)
    sfa.model.SCFM.setup_anndata(adata_train, batch_key=BATCH_KEY)
    model = sfa.model.SCFM(adata_train)
    _log(f"training stage 1 on {adata_train.n_obs:,} cells for {args.epochs} epochs")
    with timer() as t_train:
        model.train(
            max_epochs=args.epochs,
            stage="vae",
            train_size=1.0,
            batch_size=128,
            accelerator=args.accelerator,
            enable_progress_bar=False,
        )
    model.to_device("cpu")

    # Every cell in one AnnData; the test donors get a placeholder train donor as batch.
    cells = _with_batch(adata, np.where(train_mask, donors, train_donors[0]), train_donors)
    _check_batch_free(model, cells[~train_mask], train_donors)

    _log("quantizing")
    with timer() as t_quant:
        qmodel = model.quantize()

    models = {"float32": model, "int8": qmodel}
    calls: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        batches = list(m._batches(cells, None, args.batch_size))  # loaded once, untimed

        def embed(m=m):
            return m.get_latent_representation(cells, batch_size=args.batch_size)

        def encode(m=m, batches=batches):
            with torch.inference_mode():
                for b in batches:
                    m.module.inference(**m.module._get_inference_input(b))

        def express(m=m):
            return m.get_normalized_expression(cells, batch_size=args.batch_size, return_numpy=True)

        calls[name] = {"embed": embed, "encode": encode, "express": express}
    _log(f"timing float32 and int8, interleaved ({args.repeats} repeats)")
    seconds = _interleaved_seconds(
        calls, {"embed": args.repeats, "encode": args.repeats, "express": 3}
    )
    out: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        z, expr = calls[name]["embed"](), calls[name]["express"]()
        t = seconds[name]
        out[name] = {
            "z": z,
            "expr": expr,
            "embed_s": t["embed"],
            "embed_cells_per_s": cells.n_obs / t["embed"],
            "encoder_s": t["encode"],
            "encoder_cells_per_s": cells.n_obs / t["encode"],
            "expr_s": t["express"],
            "expr_cells_per_s": cells.n_obs / t["express"],
            "checkpoint_mib": _checkpoint_mib(m.module),
            "knn": knn_transfer(
                z[train_mask], labels[train_mask], z[~train_mask], labels[~train_mask], args.knn_k
            ),
        }
    zf, zq = out["float32"]["z"], out["int8"]["z"]
    cos = _cosine(zq, zf)
    mixed = knn_transfer(
        zf[train_mask], labels[train_mask], zq[~train_mask], labels[~train_mask], args.knn_k
    )
    agreement = {
        "cosine_median": float(np.median(cos)),
        "cosine_min": float(cos.min()),
        "cosine_p01": float(np.quantile(cos, 0.01)),
        "relative_frobenius_error": float(np.linalg.norm(zq - zf) / np.linalg.norm(zf)),
        "expression_pearson_r_log": _log_pearson(out["int8"]["expr"], out["float32"]["expr"]),
        "knn_float_ref_int8_query": mixed,
    }
    results = {
        name: {k: v for k, v in rec.items() if k not in ("z", "expr")} for name, rec in out.items()
    }
    n_linear = sum(type(mod) is torch.nn.Linear for mod in model.module.modules())
    return {
        "benchmark": "quantization",
        "dataset": DATASET,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment_info(),
        "data": {
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            "train_donors": train_donors,
            "test_donors": test_donors,
            "n_train_cells": int(train_mask.sum()),
            "n_test_cells": int((~train_mask).sum()),
        },
        "model": {
            "summary": str(model),
            "epochs": args.epochs,
            "train_wall_s": t_train["seconds"],
            "quantize_wall_s": t_quant["seconds"],
            "n_linear_layers": n_linear,
        },
        "results": results,
        "agreement": agreement,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown."""
    env, data, cfg, mdl = (report[k] for k in ("environment", "data", "config", "model"))
    res, agr = report["results"], report["agreement"]
    f32, i8 = res["float32"], res["int8"]
    lines = [
        f"## Quantization benchmark: {report['dataset']}",
        "",
        f"Environment: torch {env.get('torch')} | CPU {env.get('cpu_model')} "
        f"({env.get('cpu_count')} cores) | threads {env.get('torch_threads')} | "
        f"scfm_adapt {env.get('scfm_adapt')}",
        f"Data: {data['n_cells']:,} cells x {data['n_genes']:,} genes; train donors "
        f"{', '.join(data['train_donors'])} ({data['n_train_cells']:,} cells) | test donors "
        f"{', '.join(data['test_donors'])} ({data['n_test_cells']:,} cells)",
        f"Model: SCFM defaults, stage 1 only, {mdl['epochs']} epochs on the train donors "
        f"({mdl['train_wall_s']:.0f} s); {mdl['n_linear_layers']} linear layers quantized "
        f"in {mdl['quantize_wall_s']:.2f} s | inference batch {cfg['batch_size']}, median of "
        f"{cfg['repeats']} (embedding) / 3 (expression) timed calls over all cells",
        "",
    ]
    k = cfg["knn_k"]
    headers = [
        "Model",
        "embed cells/s",
        "embed speed-up",
        "encoder-only cells/s",
        "encoder speed-up",
        "expr cells/s",
        "checkpoint MiB",
        f"kNN acc (k={k})",
        "kNN macro-F1",
    ]
    rows = [
        [
            name,
            fmt(r["embed_cells_per_s"], ",.0f"),
            fmt(r["embed_cells_per_s"] / f32["embed_cells_per_s"], ".2f", "x"),
            fmt(r["encoder_cells_per_s"], ",.0f"),
            fmt(r["encoder_cells_per_s"] / f32["encoder_cells_per_s"], ".2f", "x"),
            fmt(r["expr_cells_per_s"], ",.0f"),
            fmt(r["checkpoint_mib"], ".2f"),
            fmt(r["knn"]["accuracy"]),
            fmt(r["knn"]["macro_f1"]),
        ]
        for name, r in (("float32", f32), ("int8 (dynamic)", i8))
    ]
    mixed = agr["knn_float_ref_int8_query"]
    rows.append(
        ["float ref -> int8 query", *[""] * 6, fmt(mixed["accuracy"]), fmt(mixed["macro_f1"])]
    )
    lines += [markdown_table(headers, rows), ""]
    headers = ["int8 vs float32", "value"]
    rows = [
        ["embedding cosine, median", fmt(agr["cosine_median"], ".5f")],
        ["embedding cosine, 1st percentile", fmt(agr["cosine_p01"], ".5f")],
        ["embedding cosine, min", fmt(agr["cosine_min"], ".5f")],
        ["embedding relative Frobenius error", fmt(agr["relative_frobenius_error"], ".4f")],
        ["normalized expression Pearson r (log)", fmt(agr["expression_pearson_r_log"], ".5f")],
    ]
    lines += [markdown_table(headers, rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the markdown report and write the JSON."""
    args = parse_args(argv)
    report = run(args)
    print(format_report(report))
    write_json(args.out, report)
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

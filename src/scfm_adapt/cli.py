"""Command line: ``scfm-adapt quickstart`` pretrains SCFM on the built-in PBMC data;
``scfm-adapt pretrain FILE [FILE ...] --out DIR`` pretrains a reference on h5ad files with
different genes (:func:`scfm_adapt.model.pretrain`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def knn_cv_accuracy(x, labels, n_splits: int = 5, k: int = 15, seed: int = 0) -> list[float]:
    """Stratified k-fold accuracy of a k-nearest-neighbour classifier on an embedding: per
    fold, :func:`scfm_adapt.metrics.knn_transfer` from the other folds' cells."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    from .metrics import knn_transfer

    labels = np.asarray(labels)
    folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
    return [
        knn_transfer(x[tr], labels[tr], x[te], labels[te], k)["accuracy"]
        for tr, te in folds.split(x, labels)
    ]


def pca_baseline(adata, n_comps: int = 50, n_top_genes: int = 2000):
    """The usual Scanpy embedding: log-normalised HVGs → PCA (the baseline to beat).

    :func:`scfm_adapt.baselines.log_normalized`, Scanpy's highly variable genes and
    ``sc.pp.pca`` (its default solver), all on every cell.
    """
    import scanpy as sc

    from .baselines import log_normalized

    b = log_normalized(adata)
    if b.n_vars > n_top_genes:
        sc.pp.highly_variable_genes(b, n_top_genes=n_top_genes, subset=True)
    sc.pp.pca(b, n_comps=min(n_comps, b.n_vars - 1, b.n_obs - 1))
    return b.obsm["X_pca"]


def quickstart(
    out: Path,
    max_epochs: int = 150,
    max_epochs_prior: int = 150,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Pretrain SCFM (both stages) on :func:`scfm_adapt.datasets.pbmc68k` and report.

    Writes ``out/pbmc68k_scfm.h5ad`` (with ``obsm["X_scfm"]``), ``out/umap_scfm.png``,
    ``out/model/`` (the checkpoint) and ``out/report.json``, and returns the report.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import scanpy as sc
    import scvi
    import torch

    import scfm_adapt as sfa

    scvi.settings.seed = seed
    out.mkdir(parents=True, exist_ok=True)
    adata = sfa.datasets.pbmc68k()
    labels_key = "bulk_labels"
    sfa.model.SCFM.setup_anndata(adata)
    model = sfa.model.SCFM(adata)
    t_stage = {}
    for stage, epochs in (("vae", max_epochs), ("prior", max_epochs_prior)):
        t0 = time.perf_counter()
        model.train(
            max_epochs=epochs,
            stage=stage,
            train_size=0.8,
            validation_size=0.1,
            enable_progress_bar=progress,
        )
        t_stage[stage] = time.perf_counter() - t0
    test_idx = np.asarray(model.test_indices)

    sfa.tl.embed(adata, model)
    sc.pp.neighbors(adata, use_rep="X_scfm")
    sc.tl.umap(adata, random_state=seed)
    fig = sc.pl.umap(adata, color=labels_key, show=False, return_fig=True, title="SCFM embedding")
    fig.savefig(out / "umap_scfm.png", dpi=120, bbox_inches="tight")

    acc = knn_cv_accuracy(adata.obsm["X_scfm"], adata.obs[labels_key])
    acc_pca = knn_cv_accuracy(pca_baseline(adata), adata.obs[labels_key])
    nll = model.get_reconstruction_error(indices=test_idx)["reconstruction_loss"]
    report = {
        "data": {
            "name": "pbmc68k_reduced (scanpy)",
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
        },
        "model": str(model),
        "knn_accuracy_5fold": {
            "mean": float(np.mean(acc)),
            "folds": acc,
            "k": 15,
            "labels": labels_key,
        },
        "baseline_pca_knn_accuracy_5fold": {"mean": float(np.mean(acc_pca)), "folds": acc_pca},
        "heldout_reconstruction_nll": {
            "value": nll,
            "n_cells": len(test_idx),
            "unit": "nats per cell (NB)",
        },
        "training_time_s": {
            **{k: round(v, 2) for k, v in t_stage.items()},
            "total": round(sum(t_stage.values()), 2),
        },
        "epochs_run": {st: len(h.get("elbo_train", [])) for st, h in model.history.items()},
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
        "scfm_adapt_version": sfa.__version__,
    }
    adata.write_h5ad(out / "pbmc68k_scfm.h5ad")
    model.save(out / "model", overwrite=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scfm-adapt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="pretrain SCFM on built-in PBMC data and report")
    q.add_argument("--out", type=Path, default=Path("scfm_quickstart"))
    q.add_argument("--max-epochs", type=int, default=150, help="epochs of the VAE stage")
    q.add_argument("--max-epochs-prior", type=int, default=150, help="epochs of the DiT stage")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-progress", action="store_true")
    p = sub.add_parser(
        "pretrain", help="pretrain a reference SCFM on h5ad files (different genes allowed)"
    )
    p.add_argument("files", nargs="+", type=Path, help="h5ad files of raw counts")
    p.add_argument("--out", type=Path, required=True, help="folder of the run")
    p.add_argument(
        "--genes",
        default="union",
        help="'union', 'intersection', or a text file with one gene per line",
    )
    p.add_argument("--batch-key", default="dataset", help="obs column naming each file")
    p.add_argument("--batch-labels", nargs="+", default=None, help="a name per file")
    p.add_argument("--labels-key", default=None, help="obs column of cell labels, if any")
    p.add_argument("--gene-ids", choices=["symbol", "ensembl"], default=None)
    p.add_argument("--layer", default=None, help="layer of counts (default X)")
    p.add_argument("--stage", choices=["both", "vae"], default="both")
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--prior-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto", help="'auto', or a number (>1: DDP)")
    p.add_argument("--model-kwargs", type=_json_object, default=None, help="JSON of SCFM args")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "pretrain":
        return _pretrain(args)
    if args.command == "quickstart":
        report = quickstart(
            args.out, args.max_epochs, args.max_epochs_prior, args.seed, not args.no_progress
        )
        summary = {
            k: report[k]
            for k in (
                "knn_accuracy_5fold",
                "baseline_pca_knn_accuracy_5fold",
                "heldout_reconstruction_nll",
                "training_time_s",
            )
        }
        print(json.dumps(summary, indent=2))
        print(f"wrote {args.out}/pbmc68k_scfm.h5ad, umap_scfm.png, report.json, model/")
    return 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not JSON ({e.msg}); give an object such as '{{\"n_tokens\": 8}}' (quoted for "
            "the shell)."
        ) from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object of SCFM arguments, {...}.")
    return value


def _pretrain(args) -> int:
    from .model import pretrain

    genes = args.genes
    if genes not in ("union", "intersection"):
        path = Path(genes)
        if not path.exists():
            raise SystemExit(f"--genes {genes!r}: not 'union', 'intersection' or a gene file.")
        genes = [g.strip() for g in path.read_text().splitlines() if g.strip()]
    train = {"batch_size": args.batch_size, "accelerator": args.accelerator}
    train["devices"] = int(args.devices) if str(args.devices).isdigit() else args.devices
    if args.prior_steps is not None:
        train["prior_steps"] = args.prior_steps
    model = pretrain(
        args.files,
        args.out,
        genes=genes,
        batch_key=args.batch_key,
        batch_labels=args.batch_labels,
        labels_key=args.labels_key,
        gene_ids=args.gene_ids,
        layer=args.layer,
        stage=args.stage,
        max_epochs=args.max_epochs,
        resume=args.resume,
        model_kwargs=args.model_kwargs,
        train_kwargs=train,
        progress=not args.no_progress,
    )
    from .model._pretrain import ddp_worker

    if ddp_worker():  # a DDP worker: the first process saves and reports
        return 0
    print(model)
    print(f"wrote {args.out}/model (model card: {args.out}/model/README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CellTypist on ``annotation.py``'s three splits, in CellTypist's own environment.

::

    benchmarks/peers/install.sh celltypist ../peer-venvs
    python benchmarks/peers/export.py ../peer-splits            # the project's environment
    ../peer-venvs/celltypist/bin/python benchmarks/peers/celltypist_run.py \\
        ../peer-splits ../peer-preds --seed 0

CellTypist's own logistic model (``celltypist.train`` with its defaults: all genes, L2
logistic regression, no feature selection, no SGD) is trained on the split's training cells
and applied to its test cells (``celltypist.annotate``, no majority voting, so each cell is
classified on its own as the other methods are). Both take log1p of counts per 10,000, as
CellTypist requires. CellTypist's probability matrix is one sigmoid per class (one against
the rest); the rows are divided by their sums so that the scorer's NLL and ECE see a
distribution, and the most probable class is unchanged. ``--seed`` only names the output
folder: CellTypist's default solver (scikit-learn's L-BFGS) draws no random numbers.

Writes ``<preds>/celltypist/seed<k>/annotation/<data set>.csv`` (one row per test cell, one
column per class) and ``meta.json`` beside them (version, settings, wall seconds).
"""

from __future__ import annotations

import json
import time
from importlib.metadata import version
from pathlib import Path

import pandas as pd
from _cli import runner_parser

DATASETS = ("kang8", "cellbench3", "pbmc68k")


def lognorm(adata):
    """log1p of counts per 10,000, the input CellTypist checks for."""
    import scanpy as sc

    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def run_split(folder: Path, threads: int) -> tuple[pd.DataFrame, float, dict]:
    """Train on ``train.h5ad``, predict ``test.h5ad``: probabilities, seconds, settings."""
    import anndata as ad
    import celltypist

    train = lognorm(ad.read_h5ad(folder / "train.h5ad"))
    test = lognorm(ad.read_h5ad(folder / "test.h5ad"))
    start = time.perf_counter()
    model = celltypist.train(train, labels="label", n_jobs=threads)
    result = celltypist.annotate(test, model=model, majority_voting=False)
    wall = time.perf_counter() - start
    proba = result.probability_matrix.loc[test.obs_names]
    proba = proba.div(proba.sum(axis=1), axis=0)
    settings = {"train": "celltypist.train defaults", "annotate": "majority_voting=False"}
    settings["classes"] = len(model.cell_types)
    settings["genes"] = len(model.features)
    return proba, wall, settings


def main(argv=None) -> None:
    parser = runner_parser(__doc__)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    out = args.preds / "celltypist" / f"seed{args.seed}" / "annotation"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"peer": "celltypist", "version": version("celltypist"), "seed": args.seed}
    for name in args.datasets:
        proba, wall, settings = run_split(args.splits / "annotation" / name, args.threads)
        proba.to_csv(out / f"{name}.csv")
        meta[name] = {"wall_s": round(wall, 2), **settings}
        print(f"celltypist {name}: {wall:.1f} s, {settings}", flush=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()

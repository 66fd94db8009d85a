"""cell-eval's Virtual Cell Challenge metrics on the cells `perturbation.py` saved.

Runs in cell-eval's own environment (its pins clash with ours), not in the project's::

    python3 -m venv ../celleval-venv && ../celleval-venv/bin/pip install cell-eval==0.8.2
    python benchmarks/perturbation.py --tasks norman_combo --variants expr_anchor \\
        --save-predictions preds --seed 0
    ../celleval-venv/bin/python benchmarks/cell_eval_runner.py preds

For every ``<preds>/seed<k>/<task>/`` folder (``real.h5ad``, ``cell_mean.h5ad`` and one file
per method, written by ``perturbation.py --save-predictions``) it computes
``MetricsEvaluator(..., control_pert="control", pert_col="condition").compute(profile="vcc")``
per method, and ``score_agg_metrics`` against the cell-mean baseline (every held-out unit
predicted as the mean training perturbed cell): 0 is the baseline, 1 perfect, and a method
worse than the baseline on a metric scores 0 on it. cell-eval requires log1p values of 0 or
more, so predicted log-normalised values below 0 (control plus a negative change, unrounded)
are clipped at 0. It prints, per task, the mean ± sd over seeds of each metric and score, and
writes ``<preds>/cell_eval_summary.csv``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

#: the columns printed (cell-eval's vcc profile plus the baseline-normalised mean score)
SHOWN = ["discrimination_score_l1", "overlap_at_N", "mae", "avg_score"]


def score_folder(folder: Path, threads: int, only: list[str] | None = None) -> pd.DataFrame:
    """Per method: cell-eval's vcc metrics (mean over units) and the scores from baseline."""
    from cell_eval import MetricsEvaluator, score_agg_metrics

    real = ad.read_h5ad(folder / "real.h5ad")
    rows, agg = {}, {}
    methods = sorted(p.stem for p in folder.glob("*.h5ad") if p.stem != "real")
    if only:
        methods = [m for m in methods if m in only]
    # the baseline first: every other method is scored against its aggregate
    for method in ["cell_mean", *(m for m in methods if m != "cell_mean")]:
        pred = ad.read_h5ad(folder / f"{method}.h5ad")
        pred.X = np.clip(pred.X, 0.0, None)
        with tempfile.TemporaryDirectory() as out:
            ev = MetricsEvaluator(
                pred,
                real.copy(),
                control_pert="control",
                pert_col="condition",
                num_threads=threads,
                outdir=out,
            )
            _, agg[method] = ev.compute(profile="vcc", write_csv=False)
        mean = agg[method].filter(agg[method]["statistic"] == "mean").drop("statistic")
        row = {k: float(v[0]) for k, v in mean.to_dict(as_series=False).items()}
        score = score_agg_metrics(agg[method], agg["cell_mean"])
        row.update(
            {f"score_{m}": float(v) for m, v in zip(score["metric"], score["from_baseline"])}
        )
        row["avg_score"] = row.pop("score_avg_score")
        rows[method] = row
    return pd.DataFrame(rows).T


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("preds", type=Path, help="the --save-predictions folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None, help="score only these")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these task folders")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    frames = []
    for folder in sorted(args.preds.glob("seed*/*/")):
        if not (folder / "real.h5ad").exists():
            continue
        if args.tasks and not any(folder.name.startswith(t) for t in args.tasks):
            continue
        table = score_folder(folder, args.threads, args.methods)
        table["seed"], table["task"] = folder.parent.name, folder.name
        frames.append(table.rename_axis("method").reset_index())
        print(f"scored {folder}", file=sys.stderr, flush=True)
    if not frames:
        raise SystemExit(
            f"No <seed>/<task>/real.h5ad under {args.preds}: run perturbation.py "
            "with --save-predictions first."
        )
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(args.preds / "cell_eval_summary.csv", index=False)
    # Kang's folds (kang[<type>]) are one task: average the folds within a seed first
    df["task"] = (
        df["task"]
        .str.replace(r"\[.*\]$", "", regex=True)
        .where(~df["task"].str.startswith("kang"), "kang")
    )
    cols = [c for c in SHOWN if c in df.columns]
    per_seed = df.groupby(["task", "method", "seed"])[cols].mean()
    for task, t in per_seed.groupby(level="task"):
        g = t.groupby(level="method")
        mean, sd = g.mean(), g.std().fillna(0.0)
        n = t.index.get_level_values("seed").nunique()
        print(f"\n== {task}: cell-eval vcc profile, mean ± sd over {n} seed(s)")
        print((mean.round(3).astype(str) + " ± " + sd.round(3).astype(str)).to_string())


if __name__ == "__main__":
    main()

"""Score the peers' predictions with the benchmarks' own metrics, beside the simple baselines.

Runs in the project's environment, after ``export.py`` and the peers' runners::

    python benchmarks/peers/score.py ../peer-preds [--ours benchmarks/results]

- Perturbation: every ``<preds>/<peer>/seed<k>/perturbation/<task>/fold<i>.h5ad`` is split
  into its units (``obs["unit"]``) and scored with ``scfm_adapt.metrics.evaluate_predictions``
  against the real cells of ``perturbation.py``'s task, rebuilt here (the same data, splits
  and energy reference, seed ``k``); ``rank`` is taken across the folds, among the units of
  the task the method predicted (all of them, except for a peer that skips some), as
  ``perturbation.py`` does. The shift and linear baselines (``no_change``, ``mean_shift``,
  ``additive``, ``linear``: deterministic, seconds) are scored in the same call. With
  ``--ours``, the rows of ``perturbation.py``'s own CSVs for the same seeds
  (``perturbation_<task>_seed<k>.csv``) are added.
- Annotation: every ``<preds>/<peer>/seed<k>/annotation/<data set>.csv`` is scored with
  ``annotation.py``'s ``evaluate`` (accuracy, macro-F1, ECE, NLL) on the seed-0 split, beside
  ``logreg_hvg``.

Prints one markdown table per task or data set, mean ± sd over the seeds found (a single
seed prints its value), with each peer's wall seconds (mean per seed, summed over folds) from
its ``meta.json``, and writes ``<preds>/scores_perturbation.csv`` and
``<preds>/scores_annotation.csv`` (one row per method, task and seed), and
``<preds>/scores_perturbation_units.csv`` (one row per method, unit and seed). A peer that
cannot predict some units (a gene it has no embedding for) is scored on the units it
predicted; the ``units`` column says how many.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parents[1]))

PERTURBATION_COLUMNS = ("pearson_delta_top20", "pearson_delta", "cosine_lfc", "energy", "rank")
ANNOTATION_COLUMNS = ("accuracy", "macro_f1", "ece", "nll")


def _seeds(preds: Path, part: str, name: str) -> dict[str, dict[int, Path]]:
    """``{peer: {seed: folder or file}}`` of everything predicted for one task or data set."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(preds.glob(f"*/seed*/{part}/*")):
        peer, seed = path.parts[-4], int(path.parts[-3].removeprefix("seed"))
        if (path.is_dir() and path.name == name) or path.name == f"{name}.csv":
            found.setdefault(peer, {})[seed] = path
    return found


def _wall(folder: Path, key: str | None = None) -> float:
    """Wall seconds from a runner's ``meta.json`` (summed over folds where there are folds)."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return float("nan")
    meta = json.loads(meta_path.read_text())
    if key is not None:
        return float(meta.get(key, {}).get("wall_s", np.nan))
    folds = meta.get("folds", [])  # {"fold0": {...}} or [{...}], each with its seconds
    folds = list(folds.values()) if isinstance(folds, dict) else folds
    seconds = [f.get("wall_s", f.get("seconds")) for f in folds]
    seconds = [float(x) for x in seconds if x is not None]  # a fold with every unit skipped
    return float(sum(seconds)) if seconds else float("nan")


def _peer_units(path: Path, ctrls: dict, genes) -> dict[str, np.ndarray]:
    """A fold's predicted cells split into its units, checked against the control cells.

    A unit the peer cannot predict (for example a gene it has no embedding for) is absent
    from the file and from the result; a unit present must have one cell per control cell.
    """
    import anndata as ad

    from _common import dense

    pred = ad.read_h5ad(path)
    if list(pred.var_names) != list(genes):
        raise ValueError(f"{path}: its genes are not the task's training genes in their order")
    x = dense(pred.X).astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: predictions hold NaN or infinite values")
    units = pred.obs["unit"].astype(str).to_numpy()
    unknown = sorted(set(units) - set(ctrls))
    if unknown:
        raise ValueError(f"{path}: units {unknown} are not held-out units of this fold")
    out = {}
    for unit in ctrls:
        rows = x[units == unit]
        if len(rows) == 0:
            continue
        if len(rows) != len(ctrls[unit]):
            raise ValueError(
                f"{path}: unit {unit!r} has {len(rows)} predicted cells; its control cells are "
                f"{len(ctrls[unit])} (one prediction per control cell in controls.h5ad order)"
            )
        out[unit] = rows
    return out


def score_task(name: str, preds: Path, ours: Path | None) -> pd.DataFrame:
    """Per (method, unit, seed): every metric; a peer is scored on the units it predicted."""
    import scfm_adapt as sfa
    from perturbation import TASKS, baseline_predictions, training_reference

    peers = _seeds(preds, "perturbation", name)
    seeds = sorted({s for per in peers.values() for s in per}) or [0]
    tasks = list(TASKS[name]())  # the data are read once, not once per seed
    tables = []
    for seed in seeds:
        scores, deltas, true_d = [], {}, {}
        for i, task in enumerate(tasks):
            cells, truth, ctrls, _ = baseline_predictions(task, scvi_epochs=None, seed=seed)
            reference = training_reference(task, seed)
            scores.append(sfa.metrics.evaluate_predictions(cells, truth, ctrls, reference))
            for peer, per_seed in peers.items():
                fold = per_seed.get(seed, Path()) / f"fold{i}.h5ad"
                if not fold.exists():
                    continue
                cells[peer] = mine = _peer_units(fold, ctrls, task["train"].var_names)
                if mine:
                    sub = {u: truth[u] for u in mine}, {u: ctrls[u] for u in mine}
                    scores.append(sfa.metrics.evaluate_predictions({peer: mine}, *sub, reference))
            for method, by_unit in cells.items():
                for u, x in by_unit.items():
                    deltas.setdefault(method, {})[u] = x.mean(0) - ctrls[u].mean(0)
            true_d.update({u: truth[u].mean(0) - ctrls[u].mean(0) for u in truth})
        table = pd.concat(scores, ignore_index=True)
        _rank_across_folds(table, deltas, true_d)
        if ours is not None and (ours / f"perturbation_{name}_seed{seed}.csv").exists():
            own = pd.read_csv(ours / f"perturbation_{name}_seed{seed}.csv")
            own = own[own["method"].str.startswith("scfm")].drop(columns=["task"])
            table = pd.concat([table, own], ignore_index=True)
        table["seed"] = seed
        table["wall_s"] = [
            _wall(peers[m][seed]) if m in peers and seed in peers[m] else np.nan
            for m in table["method"]
        ]
        table["task"] = name
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def _rank_across_folds(table: pd.DataFrame, deltas: dict, true_d: dict) -> None:
    """``rank`` (in place) of each method's units among all units of the task it predicted,
    every fold together, as ``perturbation.py`` computes it (NaN below two units)."""
    import scfm_adapt as sfa

    table["rank"] = np.nan
    for method, d in deltas.items():
        units = [u for u in true_d if u in d]
        if len(units) < 2:
            continue
        truth = np.stack([true_d[u] for u in units])
        r = sfa.metrics.rank_metric(np.stack([d[u] for u in units]), truth)
        for u, v in zip(units, r):
            table.loc[(table["method"] == method) & (table["unit"] == u), "rank"] = v


def per_seed(units: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method, seed): the mean over units of each metric, the units scored and
    the wall seconds."""
    keys = ["task", "method", "seed"]
    groups = units.groupby(keys, sort=False)
    out = groups[list(PERTURBATION_COLUMNS)].mean()
    out["units"] = groups["unit"].nunique()
    out["wall_s"] = groups["wall_s"].first()
    return out.reset_index()


def score_annotation(name: str, preds: Path) -> pd.DataFrame:
    """Per (method, seed): accuracy, macro-F1, ECE and NLL of one data set's test cells."""
    from _annotation import evaluate, load_split, logreg_hvg
    from scfm_adapt import baselines

    split = load_split(name)
    rows = [{**evaluate(logreg_hvg(split), split), "seed": 0}]
    for peer, per_seed in _seeds(preds, "annotation", name).items():
        for seed, path in sorted(per_seed.items()):
            proba = pd.read_csv(path, index_col=0)
            if list(proba.index.astype(str)) != list(split.test.obs_names):
                raise ValueError(f"{path}: rows are not the test cells of {name} in order")
            result = baselines.AnnotationResult(
                method=peer,
                proba=proba.to_numpy(),
                classes=[str(c) for c in proba.columns],
                trainable_params=0,
                wall_s=_wall(path.parent, name),
                notes="",
            )
            rows.append({**evaluate(result, split), "seed": seed})
    table = pd.DataFrame(rows)
    table["task"] = name
    return table


def mean_sd(table: pd.DataFrame, columns) -> pd.DataFrame:
    """``mean ± sd`` over seeds per method (the value alone for one seed)."""
    groups = table.groupby("method", sort=False)
    out = {}
    for col in [*columns, "wall_s"]:
        mean, sd, n = groups[col].mean(), groups[col].std(), groups[col].count()
        out[col] = [
            "n/a" if not np.isfinite(m) else (f"{m:.3f}" if k < 2 else f"{m:.3f} ± {s:.3f}")
            for m, s, k in zip(mean, sd, n)
        ]
    out["seeds"] = list(groups["seed"].nunique())
    return pd.DataFrame(out, index=groups[columns[0]].mean().index)


def main(argv=None) -> None:
    from _annotation import DATASETS
    from perturbation import TASKS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("preds", type=Path, help="the predictions' folder")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--ours", type=Path, default=None, help="perturbation.py's CSVs")
    args = parser.parse_args(argv)
    np.seterr(all="ignore")
    if args.tasks:
        units = pd.concat([score_task(n, args.preds, args.ours) for n in args.tasks])
        units.to_csv(args.preds / "scores_perturbation_units.csv", index=False)
        table = per_seed(units)
        table.to_csv(args.preds / "scores_perturbation.csv", index=False)
        for name, part in table.groupby("task", sort=False):
            print(f"\n## perturbation: {name}\n")
            shown = mean_sd(part, list(PERTURBATION_COLUMNS))
            shown.insert(0, "units", part.groupby("method", sort=False)["units"].max())
            print(shown.to_markdown())
    if args.datasets:
        tables = [score_annotation(name, args.preds) for name in args.datasets]
        table = pd.concat(tables, ignore_index=True).drop(columns=["per_class_f1", "notes"])
        table.to_csv(args.preds / "scores_annotation.csv", index=False)
        for name, part in table.groupby("task", sort=False):
            print(f"\n## annotation: {name}\n")
            print(mean_sd(part, list(ANNOTATION_COLUMNS)).to_markdown())


if __name__ == "__main__":
    main()

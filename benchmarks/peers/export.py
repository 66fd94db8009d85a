"""Write the benchmarks' splits as plain h5ad files that a peer reads in its own environment.

Runs in the project's environment::

    python benchmarks/peers/export.py ../peer-splits

- ``annotation/<data set>/``: ``train.h5ad`` and ``test.h5ad`` of ``annotation.py``'s split
  (raw counts, ``obs["label"]``, ``obs["batch"]`` where the split has a batch) and
  ``split.json`` (the classes, whether there is a batch).
- ``perturbation/<task>/fold<i>/``: one fold of ``perturbation.py``'s task. ``train.h5ad``
  holds the fold's training cells (raw counts; ``obs["perturbation"]`` with ``"control"`` for
  control cells and ``"A+B"`` for a combination, ``obs["context"]`` the covariate, ``""``
  where the task has none); ``controls.h5ad`` the control cells each held-out unit starts
  from, ``obs["unit"]`` naming the unit; ``fold.json`` the fold's name and its units
  (perturbation, context); for the tasks whose model takes GO features (``features="go"``
  in ``perturbation.py``), ``gene_features.csv``: the same GO vector per perturbed gene
  (``scfm_adapt.datasets.go_gene_features``, 64 numbers; a gene without GO terms is absent)
  that PerturbationModel and the linear baseline get.

A peer writes, per fold, ``<preds>/<peer>/seed<k>/perturbation/<task>/fold<i>.h5ad``: one
predicted cell per control cell of ``controls.h5ad`` (same order, same ``obs["unit"]``),
log1p of counts per 10,000 in ``X`` on the training genes; and per data set
``<preds>/<peer>/seed<k>/annotation/<data set>.csv``: one row per test cell, one column of
probabilities per class. ``score.py`` scores both with the benchmarks' own metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))

CONTROL = "control"


def export_annotation(out: Path, names) -> None:
    from _annotation import load_split

    for name in names:
        split = load_split(name)
        folder = out / "annotation" / name
        folder.mkdir(parents=True, exist_ok=True)
        for part, adata in (("train", split.train), ("test", split.test)):
            adata = adata.copy()
            adata.obs["label"] = adata.obs[split.label_key].astype(str)
            if split.batch_key is not None:
                adata.obs["batch"] = adata.obs[split.batch_key].astype(str)
            adata.obs = adata.obs[[c for c in ("label", "batch") if c in adata.obs]]
            adata.uns = {}
            adata.write_h5ad(folder / f"{part}.h5ad")
        meta = {
            "name": name,
            "classes": split.classes,
            "has_batch": split.batch_key is not None,
            "description": split.description,
        }
        (folder / "split.json").write_text(json.dumps(meta, indent=1))
        print(f"annotation/{name}: {split.train.n_obs} train, {split.test.n_obs} test cells")


def _plain(adata, setup: dict) -> object:
    """A copy with ``obs`` reduced to ``perturbation`` and ``context`` (see the docstring)."""
    adata = adata.copy()
    pert = adata.obs[setup["perturbation_key"]].astype(str).to_numpy()
    pert = np.where(pert == setup["control_group"], CONTROL, pert)
    keys = setup.get("covariate_keys") or []
    ctx = adata.obs[keys[0]].astype(str).to_numpy() if keys else np.full(adata.n_obs, "")
    adata.obs = adata.obs.iloc[:, :0].assign(perturbation=pert, context=ctx)
    adata.uns, adata.obsm, adata.layers = {}, {}, {}
    return adata


def _gene_features(task: dict):
    """GO features of every gene perturbed in the fold, training and held out."""
    import scfm_adapt as sfa

    perts = set(task["train"].obs[task["setup"]["perturbation_key"]].astype(str))
    perts |= {p for p, _ in task["test"]}
    genes = sorted({g for p in perts for g in p.split("+")} - {task["setup"]["control_group"]})
    return sfa.datasets.go_gene_features(genes)


def export_perturbation(out: Path, names) -> None:
    import anndata as ad

    from perturbation import TASKS, unit_name

    for name in names:
        for i, task in enumerate(TASKS[name]()):
            folder = out / "perturbation" / name / f"fold{i}"
            folder.mkdir(parents=True, exist_ok=True)
            setup = task["setup"]
            _plain(task["train"], setup).write_h5ad(folder / "train.h5ad")
            blocks, units = [], []
            for (p, ctx), (ctrl, _) in task["test"].items():
                unit = unit_name(p, ctx)
                c = _plain(ctrl, setup)
                c.obs["unit"] = unit
                c.obs_names = [f"{unit}:{j}" for j in range(c.n_obs)]
                blocks.append(c)
                pert = CONTROL if p == setup["control_group"] else p
                units.append({"unit": unit, "perturbation": pert, "context": ctx})
            ad.concat(blocks).write_h5ad(folder / "controls.h5ad")
            if task["features"] == "go":
                _gene_features(task).to_csv(folder / "gene_features.csv")
            meta = {"task": name, "fold": task["name"], "units": units}
            (folder / "fold.json").write_text(json.dumps(meta, indent=1))
            print(f"perturbation/{name}/fold{i} ({task['name']}): {len(units)} units")


def main(argv=None) -> None:
    from _annotation import DATASETS
    from perturbation import TASKS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args(argv)
    export_annotation(args.out, args.datasets)
    export_perturbation(args.out, args.tasks)


if __name__ == "__main__":
    main()

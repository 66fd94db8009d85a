"""scArches / SCANVI query mapping on ``annotation.py``'s three splits, one seed per run.

Runs in the project's environment: scvi-tools, which implements scArches' surgery
(``SCANVI.load_query_data``), is the project's own dependency (1.4.2), so no second
environment is needed::

    python benchmarks/peers/scarches_run.py ../peer-preds --seed 0

It is ``scfm_adapt.baselines.scanvi`` (the ``scanvi`` row of ``annotation.py``) run with the
model seed ``--seed`` on the seed-0 splits: a scArches-style scVI reference (2 layers,
layer norm, encoded covariates, 10 latent dimensions) on the training cells' HVGs (selected
on the training cells), SCANVI from it with the training labels, and, where the test cells
come from unseen batches (kang8's donors, cellbench3's protocol), scArches surgery onto
them with a brief unlabelled query training; then ``predict(soft=True)``. Epochs follow the
baseline's budgets (scvi-tools' tutorials), not tuned here.

Writes ``<preds>/scarches_scanvi/seed<k>/annotation/<data set>.csv`` in the format of
``export.py`` and ``meta.json`` (versions, epochs, wall seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parents[1]))

DATASETS = ("kang8", "cellbench3", "pbmc68k")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("preds", type=Path, help="the predictions' folder")
    parser.add_argument("--seed", type=int, default=0, help="the models' seed (splits: 0)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from _annotation import hvg_names, load_split
    from _common import quiet
    from scfm_adapt import baselines

    torch.set_num_threads(args.threads)
    quiet()
    out = args.preds / "scarches_scanvi" / f"seed{args.seed}" / "annotation"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"peer": "scarches_scanvi", "scvi-tools": version("scvi-tools"), "seed": args.seed}
    for name in args.datasets:
        split = load_split(name)  # seed-0 splits, as every other row
        result = baselines.scanvi(
            split.train,
            split.test,
            split.label_key,
            split.batch_key,
            genes=hvg_names(split),
            seed=args.seed,
        )
        proba = pd.DataFrame(result.proba, index=split.test.obs_names, columns=result.classes)
        proba.to_csv(out / f"{name}.csv")
        meta[name] = {
            "wall_s": round(result.wall_s, 1),
            "trainable_params": result.trainable_params,
            "notes": result.notes,
        }
        print(f"scarches_scanvi {name}: {result.wall_s:.0f} s; {result.notes}", flush=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()

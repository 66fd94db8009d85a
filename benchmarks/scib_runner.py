"""scIB's metrics (``scib-metrics``) of the embeddings ``embedding.py`` saved.

``scib-metrics`` needs JAX, which this project does not install (its extras would pull a
CUDA build), so this script runs in an environment of its own and imports nothing of
``scfm_adapt``::

    python3 -m venv /tmp/scib && /tmp/scib/bin/pip install scib-metrics anndata
    /tmp/scib/bin/python benchmarks/scib_runner.py benchmarks/results/embedding.npz ...

Per ``.npz`` (one seed): every ``embedding_<model>`` is scored on all cells with
``obs["cluster_id"]`` as the cell type and the donor as the batch, by scib-metrics'
``Benchmarker`` with its default metrics (bio conservation: isolated labels, k-means
NMI / ARI, silhouette, cLISI; batch correction: BRAS, iLISI, kBET, graph connectivity, PCR
comparison against the PCA embedding, the pre-integration reference), unscaled. With
several files it also prints mean ± sd over them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def score(path: Path) -> pd.DataFrame:
    import anndata as ad
    from scib_metrics.benchmark import Benchmarker

    data = np.load(path, allow_pickle=False)
    keys = [k for k in data.files if k.startswith("embedding_")]
    obs = pd.DataFrame({"cell_type": data["labels"], "batch": data["batches"]})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(obs=obs)
    for k in keys:
        adata.obsm[k.removeprefix("embedding_")] = np.asarray(data[k], dtype=np.float32)
    names = [k.removeprefix("embedding_") for k in keys if k != "embedding_lognorm"]
    bench = Benchmarker(
        adata,
        batch_key="batch",
        label_key="cell_type",
        embedding_obsm_keys=names,
        pre_integrated_embedding_obsm_key="pca" if "pca" in names else None,
        progress_bar=False,
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    return table.drop(index="Metric Type", errors="ignore").astype(float)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="JSON of every table")
    args = p.parse_args()
    tables = {str(f): score(f) for f in args.npz}
    pd.set_option("display.width", 250)
    for f, t in tables.items():
        print(f"\n{f}\n{t.round(3).to_string()}")
    if len(tables) > 1:
        stacked = pd.concat(tables.values(), keys=list(tables))
        summary = stacked.groupby(level=1).agg(["mean", "std"])
        print("\nmean ± sd over the files\n" + summary.round(3).to_string())
    if args.out:
        args.out.write_text(json.dumps({f: t.to_dict() for f, t in tables.items()}, indent=1))


if __name__ == "__main__":
    main()

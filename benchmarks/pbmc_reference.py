"""The PBMC reference: SCFM pretrained across the PBMC files of ``../shared/data`` with
``scfm_adapt.model.pretrain``, leaving out the cells the label-efficiency benchmark queries.

    python benchmarks/pbmc_reference.py [--out benchmarks/results/pbmc_reference]

Pretraining files (each one batch):

- ``kang2018_ctrl_8donors``: the control PBMCs of 6 of the 8 donors. Donors 1244 and 1488
  (``KANG_TEST_DONORS``, the annotation benchmark's test donors) are the kang8 query and
  are written out of the file before pretraining;
- ``kang2018_ifnb_muscat``: IFN-beta stimulated and control PBMCs (2 other donors);
- ``citeseq_pbmc10k_200cells`` and ``citeseq_pbmc5k_200cells``: their RNA counts.

``pbmc68k_reduced_counts`` (the other query) is not pretrained on. The gene vocabulary is
the union of the two Kang files' genes and those of pbmc68k's gene *names* that a
pretraining file measures (no pbmc68k cells or labels are read for it): the reference is
built to serve both queries, and a query that measured under half of it would be masked
more than it is read. Every file measures part
of the vocabulary; the genes it lacks are masked for its cells.

The input files as pretrained on go to ``<out>_inputs/``; the folder gets ``data.h5ad``
(the combined counts), ``checkpoints/``, ``run.json`` and
``model/`` (weights, config and the model card ``README.md``); the weights are never
committed, this command rebuilds them. ``obs["cell_type"]`` of the combined data holds the
Kang control cells' types (``cluster_id``; ``"Unknown"`` for the other files' cells), for
the reference annotator of zero-shot label transfer (``label_efficiency.py``); the model
itself is trained without labels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from _annotation import KANG_TEST_DONORS
from _common import quiet

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "pbmc_reference"
#: The files pretrained on, and their batch names.
FILES = {
    "kang_ctrl": "kang2018_ctrl_8donors.h5ad",
    "kang_ifnb": "kang2018_ifnb_muscat.h5ad",
    "citeseq_10k": "citeseq_pbmc10k_200cells.h5ad",
    "citeseq_5k": "citeseq_pbmc5k_200cells.h5ad",
}
QUERY_FILE = "pbmc68k_reduced_counts.h5ad"


def _genes(path: Path) -> list[str]:
    import anndata as ad
    import h5py

    with h5py.File(path, "r") as f:
        return [str(g) for g in ad.io.read_elem(f["var"]).index]


def vocabulary(data: Path) -> list[str]:
    """The two Kang files' genes, then pbmc68k's genes they lack that a pretraining file
    measures (names only: a gene no file measures could not be learned)."""
    genes: dict[str, None] = {}
    for name in (FILES["kang_ctrl"], FILES["kang_ifnb"]):
        genes.update(dict.fromkeys(_genes(data / name)))
    measured = {g for name in FILES.values() for g in _genes(data / name)}
    genes.update(dict.fromkeys(g for g in _genes(data / QUERY_FILE) if g in measured))
    return list(genes)


def build(out: Path, max_epochs: int, prior_steps: int, seed: int, progress: bool):
    import anndata as ad
    import scvi

    import scfm_adapt as sfa

    data = sfa.datasets.data_dir()
    if data is None:
        raise SystemExit("The PBMC files are not found: set SCFM_ADAPT_DATA to ../shared/data.")
    scvi.settings.seed = seed
    # the files as pretrained on, kept beside the run (its model card lists their SHA-256)
    inputs = out.with_name(f"{out.name}_inputs")
    inputs.mkdir(parents=True, exist_ok=True)
    kang = ad.read_h5ad(data / FILES["kang_ctrl"])
    kang = kang[~np.isin(kang.obs["sample_id"].astype(str), KANG_TEST_DONORS)].copy()
    kang.obs["cell_type"] = kang.obs["cluster_id"].astype(str)
    paths = {"kang_ctrl": inputs / "kang_ctrl.h5ad"}
    kang.write_h5ad(paths["kang_ctrl"])
    for label in ("kang_ifnb", "citeseq_10k", "citeseq_5k"):
        a = ad.read_h5ad(data / FILES[label])
        a.obs = a.obs.iloc[:, :0].copy()
        # labels: the Kang control types only; "Unknown" elsewhere (unlabelled cells)
        a.obs["cell_type"] = "Unknown"
        paths[label] = inputs / f"{label}.h5ad"
        a.write_h5ad(paths[label])
    t0 = time.perf_counter()
    model = sfa.model.pretrain(
        list(paths.values()),
        out,
        genes=vocabulary(data),
        batch_labels=list(paths),
        max_epochs=max_epochs,
        train_kwargs={"prior_steps": prior_steps},
        progress=progress,
    )
    return model, time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-epochs", type=int, default=60, help="VAE epochs (early stop)")
    parser.add_argument("--prior-steps", type=int, default=3000, help="DiT prior steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    quiet()
    import torch

    torch.set_num_threads(max(1, int(__import__("os").environ.get("OMP_NUM_THREADS", "2"))))
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it (or pass --out) to rebuild.")
    model, seconds = build(
        args.out, args.max_epochs, args.prior_steps, args.seed, not args.no_progress
    )
    print(model)
    print(f"PBMC reference: {model.adata.n_obs} cells, {len(model.var_names_)} genes, "
          f"built in {seconds:.0f} s; {args.out / 'model'} (card: README.md)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

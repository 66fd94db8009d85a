"""GEARS (Roohani et al. 2023, ``cell-gears`` 0.1.2) on ``perturbation.py``'s tasks, one seed.

Runs in GEARS' own environment, never the project's (``install.sh`` pins torch 2.13.0 CPU,
``cell-gears==0.1.2`` and torch-geometric), on the files ``export.py`` writes::

    benchmarks/peers/install.sh gears ../peer-venvs
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ../peer-venvs/gears/bin/python \\
        benchmarks/peers/gears_run.py ../peer-splits ../peer-preds --seed 0 \\
        --tasks norman_combo norman_unseen mcfaline kang --threads 1

Per fold of ``<splits>/perturbation/<task>/fold<i>/`` it

1. log-normalises the training cells (``normalize_total`` to 10,000, then ``log1p``: GEARS'
   documented preprocessing, on the same scale as the predictions we write) and renames the
   perturbations to GEARS' conditions (``"control"`` -> ``"ctrl"``, ``"A"`` -> ``"A+ctrl"``,
   ``"A+B"`` kept); ``obs["cell_type"]`` is one constant (GEARS has no covariate: mcfaline's
   three lines are pooled, A172 contributing its control cells only);
2. writes GEARS' GO files offline (below) and runs ``PertData.new_data_process`` (DE genes,
   cell graphs: every perturbed cell paired with a random training control cell);
3. splits with ``prepare_split(split="custom")``: GEARS trains on the fold's training cells
   only (less its validation part and any perturbation of a gene without GO annotation, which
   GEARS cannot embed); its validation set (model selection by validation top-20 DE MSE,
   GEARS' rule) is a random 10% (at least one) of the training *perturbations* where the
   held-out units are perturbations unseen in training (norman_combo, norman_unseen, GEARS'
   own setting), and a random 10% of each training perturbation's *cells* where every
   held-out perturbation was seen in training (mcfaline: holding out whole perturbations
   would remove a target perturbation from training). Held-out cells are never read, except
   the controls;
4. trains ``GEARS`` with its documented defaults (hidden size 64, one GO and one
   co-expression GNN layer, decoder hidden size 16, 20 neighbours, lr 1e-3, weight decay
   5e-4, StepLR gamma 0.5) and the README's batch size 32, for ``--epochs`` 8 (the README
   trains 20; capped so a fold trains in about 3 minutes on one CPU thread; with the learning
   rate halved every epoch, 8 epochs take 99.6% of the 20 epochs' summed learning rate);
5. predicts every held-out unit with ``GEARS.predict`` (the mean over 300 training control
   cells it samples) and turns it into cells by the shift baselines' rule "control + predicted
   change": delta = GEARS' prediction minus GEARS' own control mean (``get_mean_control``: the
   mean of the log-normalised training control cells, as ``GEARS.GI_predict`` does), added to
   each of the unit's control cells of ``controls.h5ad`` (log1p of counts per 10,000). For
   mcfaline the delta learnt on the pooled lines is added to A172's control cells.

GO files, offline: GEARS downloads ``gene2go_all.pkl``, ``essential_all_data_pert_genes.pkl``
and the ``go_essential_all`` graph from Harvard Dataverse, skipping a download where the file
exists. Here ``gene2go_all.pkl`` ({symbol: set of GO ids}) is written from
``../shared/data/go/human_gene2go_orgHsegdb_3.16.tsv.gz`` (direct annotations, all three
ontologies, "ND" no-data annotations dropped); the perturbation graph's genes are passed as
``PertData(gene_set_path=...)`` (GEARS' custom graph: the training genes, every perturbed
gene of the fold, held-out units included, as GEARS' own ``default_pert_graph=False`` list
plus the held-out genes), and the GO graph is GEARS' ``make_GO`` (Jaccard of GO sets > 0.1)
on those genes, computed with one worker into ``./data/go_essential_<task>.csv`` of a
scratch folder, where GEARS' ``get_similarity_network`` finds it. A held-out unit whose gene
has no GO annotation cannot be predicted by GEARS: its rows are left out and ``meta.json``
says so. kang (IFN-beta stimulation) is no gene perturbation: GEARS does not apply, only a
``meta.json`` saying so is written.

Writes ``<preds>/gears/seed<k>/perturbation/<task>/fold<i>.h5ad`` (``export.py``'s format)
and ``meta.json`` (versions, settings, wall seconds, skipped units).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import random
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from _cli import runner_parser

TASKS = ("norman_combo", "norman_unseen", "mcfaline", "kang")
NOT_APPLICABLE = {
    "kang": "IFN-beta stimulation is not a gene perturbation: GEARS predicts the effect of "
    "perturbing genes in its GO graph, so it does not apply; no predictions written."
}
#: the shared data: ``$SCFM_ADAPT_DATA`` or ``../shared/data`` beside the checkout
DATA = Path(os.environ.get("SCFM_ADAPT_DATA", Path(__file__).resolve().parents[3] / "shared/data"))
GO_TABLE = DATA / "go" / "human_gene2go_orgHsegdb_3.16.tsv.gz"
CONTROL = "control"
CELL_TYPE = "pooled"
VAL_FRACTION = 0.1
TARGET_SUM = 1e4
# GEARS' documented defaults (GEARS.model_initialize), written into meta.json
MODEL = {
    "hidden_size": 64,
    "num_go_gnn_layers": 1,
    "num_gene_gnn_layers": 1,
    "decoder_hidden_size": 16,
    "num_similar_genes_go_graph": 20,
    "num_similar_genes_co_express_graph": 20,
    "coexpress_threshold": 0.4,
    "uncertainty": False,
    "direction_lambda": 0.1,
}
TRAIN = {"lr": 1e-3, "weight_decay": 5e-4}


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (GEARS draws from the legacy global generator)
    torch.manual_seed(seed)


def load_gene2go(path: Path = GO_TABLE) -> dict[str, set[str]]:
    """{gene symbol: set of GO ids}, GEARS' ``gene2go_all.pkl`` format, without "ND" rows."""
    with gzip.open(path, "rt") as f:
        table = pd.read_csv(f, sep="\t", usecols=["symbol", "go_id", "evidence"])
    table = table[table["evidence"] != "ND"].dropna()
    return {g: set(ids) for g, ids in table.groupby("symbol")["go_id"]}


def lognorm(adata: ad.AnnData) -> ad.AnnData:
    """log1p of counts per 10,000 (sparse CSR float32, as GEARS' cell graphs expect)."""
    adata = adata.copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
    sc.pp.log1p(adata)
    return adata


def gears_condition(perturbation: str) -> str:
    """Our perturbation name as GEARS' condition: "ctrl", "A+ctrl" or "A+B"."""
    if perturbation == CONTROL:
        return "ctrl"
    return perturbation if "+" in perturbation else f"{perturbation}+ctrl"


def genes_of(perturbation: str) -> list[str]:
    return [] if perturbation == CONTROL else perturbation.split("+")


def read_fold(folder: Path) -> tuple[ad.AnnData, ad.AnnData, list[dict]]:
    train = ad.read_h5ad(folder / "train.h5ad")
    controls = ad.read_h5ad(folder / "controls.h5ad")
    units = json.loads((folder / "fold.json").read_text())["units"]
    if not controls.var_names.equals(train.var_names):
        raise ValueError(f"{folder}: controls.h5ad and train.h5ad have different genes")
    return train, controls, units


def gears_adata(train: ad.AnnData, pert_genes: set[str]) -> tuple[ad.AnnData, list[str]]:
    """The training cells as GEARS' input; cells of a perturbation with a gene outside the
    GO graph are dropped (as ``PertData.load`` does), their conditions returned."""
    adata = lognorm(train)
    cond = np.array([gears_condition(p) for p in adata.obs["perturbation"].astype(str)])
    adata.obs = pd.DataFrame(
        {"condition": cond, "cell_type": CELL_TYPE}, index=adata.obs_names.astype(str)
    )
    adata.var = pd.DataFrame({"gene_name": adata.var_names.astype(str)}, index=adata.var_names)
    keep = np.array(
        [c == "ctrl" or all(g in pert_genes for g in c.split("+") if g != "ctrl") for c in cond]
    )
    return adata[keep].copy(), sorted(set(cond[~keep]))


def write_go_files(work: Path, gene2go: dict, genes: list[str]) -> Path:
    """GEARS' offline inputs in ``work``: ``gene2go_all.pkl`` and the perturbation graph's
    gene list (for ``PertData(gene_set_path=...)``); returns the latter's path."""
    with open(work / "gene2go_all.pkl", "wb") as f:
        pickle.dump(gene2go, f)
    gene_set = work / "pert_graph_genes.pkl"
    with open(gene_set, "wb") as f:
        pickle.dump(sorted(set(genes)), f)
    (work / "data").mkdir(exist_ok=True)  # make_GO's "./data/go_essential_<name>.csv"
    return gene_set


def val_rule(conditions: list[str], held_out: list[str]) -> str:
    """``"cells"`` where every held-out perturbation was seen in training, else
    ``"perturbations"``."""
    return "cells" if all(c in conditions for c in held_out) else "perturbations"


def custom_split(conditions: list[str], rule: str, rng: np.random.Generator) -> dict:
    """GEARS' custom split dict: train / val conditions, no test (we predict ourselves)."""
    perts = sorted(c for c in conditions if c != "ctrl")
    if rule == "cells":
        return {"train": ["ctrl", *perts], "val": [], "test": []}
    n_val = max(1, round(VAL_FRACTION * len(perts)))
    val = sorted(rng.choice(perts, n_val, replace=False).tolist())
    return {"train": ["ctrl", *[p for p in perts if p not in val]], "val": val, "test": []}


def cell_level_loaders(pert_data, batch_size: int, rng: np.random.Generator) -> int:
    """GEARS' loaders from a split of each perturbation's cell graphs: a random 10% (at
    least one) to validation, the rest and every control cell to training. Mirrors
    ``PertData.get_dataloader`` (which takes whole conditions only, and fails on an empty
    validation list: ``num_samples should be a positive integer value, but got
    num_samples=0``); returns the number of validation cells."""
    from torch_geometric.data import DataLoader

    pert_data.node_map = {x: i for i, x in enumerate(pert_data.adata.var.gene_name)}
    pert_data.gene_names = pert_data.adata.var.gene_name
    train, val = [], []
    for cond in pert_data.set2conditions["train"]:
        graphs = pert_data.dataset_processed[cond]
        if cond == "ctrl" or len(graphs) < 2:
            train.extend(graphs)
            continue
        order = rng.permutation(len(graphs))
        n_val = max(1, round(VAL_FRACTION * len(graphs)))
        val.extend(graphs[i] for i in order[:n_val])
        train.extend(graphs[i] for i in order[n_val:])
    pert_data.dataloader = {
        "train_loader": DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
        "val_loader": DataLoader(val, batch_size=batch_size, shuffle=True),
    }
    return len(val)


def prepare_gears(
    work: Path, task: str, adata, gene_set: Path, held_out: list[str], seed: int, batch_size: int
) -> tuple:
    """``PertData`` processed, split and with its loaders; returns it and the split info."""
    from gears import PertData

    pert_data = PertData(str(work), gene_set_path=str(gene_set), default_pert_graph=False)
    pert_data.new_data_process(dataset_name=task, adata=adata)
    conditions = sorted(pert_data.adata.obs["condition"].astype(str).unique())
    rng = np.random.default_rng(seed)
    rule = val_rule(conditions, held_out)
    split = custom_split(conditions, rule, rng)
    with open(work / "split.pkl", "wb") as f:
        pickle.dump(split, f)
    pert_data.prepare_split(split="custom", seed=seed, split_dict_path=str(work / "split.pkl"))
    if rule == "cells":
        val = f"{cell_level_loaders(pert_data, batch_size, rng)} cells"
    else:
        pert_data.get_dataloader(batch_size=batch_size, test_batch_size=batch_size)
        pert_data.dataloader.pop("test_loader")  # empty: GEARS.train then skips its test
        val = split["val"]
    return pert_data, {"rule": rule, "val": val}


@contextlib.contextmanager
def dense_x(adata):
    """``adata.X`` dense for the block, sparse again after it.

    ``GEARS.__init__`` takes the control mean as ``adata.X[adata.obs.condition == 'ctrl']``:
    with scipy 1.17 and pandas 2 a sparse matrix indexed by a boolean pandas Series fails
    (``AttributeError: 'Series' object has no attribute 'nonzero'``); a dense array takes it.
    GEARS' later steps need the sparse matrix (``.toarray()``), hence the restore.
    """
    sparse = adata.X
    adata.X = sparse.toarray()
    try:
        yield adata
    finally:
        adata.X = sparse


def train_gears(pert_data, epochs: int):
    """GEARS with its defaults, trained on the CPU. ``make_GO`` is run first with one worker
    (GEARS' default is a pool of 25) into ``./data``, where ``model_initialize`` reads it."""
    from gears import GEARS
    from gears.utils import make_GO

    make_GO(pert_data.data_path, pert_data.pert_names, pert_data.dataset_name, num_workers=1)
    with dense_x(pert_data.adata):
        model = GEARS(pert_data, device="cpu")
    model.model_initialize(**MODEL)
    model.train(epochs=epochs, **TRAIN)
    return model


def predict_deltas(model, units: list[dict]) -> tuple[dict, dict]:
    """{unit: GEARS' predicted mean minus its control mean}; {unit: why skipped}."""
    from gears.utils import get_mean_control

    ctrl_mean = get_mean_control(model.adata).to_numpy()
    deltas, skipped = {}, {}
    for unit in units:
        genes = genes_of(unit["perturbation"])
        missing = [g for g in genes if g not in model.pert_list]
        if missing:
            skipped[unit["unit"]] = f"not in GEARS' GO graph (no GO annotation): {missing}"
            continue
        pred = model.predict([genes])["_".join(genes)]
        deltas[unit["unit"]] = np.asarray(pred, dtype=np.float64) - ctrl_mean
    return deltas, skipped


def predicted_cells(controls: ad.AnnData, deltas: dict) -> ad.AnnData:
    """Each held-out unit's control cells (log1p CP10k) plus its delta, in
    ``controls.h5ad``'s order; rows of skipped units left out."""
    units = controls.obs["unit"].astype(str).to_numpy()
    keep = np.isin(units, list(deltas))
    x = lognorm(controls[keep]).X.toarray().astype(np.float64)
    x += np.stack([deltas[u] for u in units[keep]])
    obs = pd.DataFrame({"unit": units[keep]}, index=controls.obs_names[keep])
    return ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=controls.var_names))


def run_fold(folder: Path, task: str, gene2go: dict, seed: int, args) -> tuple:
    """Train GEARS on one fold and predict its held-out units; returns cells and fold meta."""
    start = time.perf_counter()
    train, controls, units = read_fold(folder)
    perturbed = {g for p in train.obs["perturbation"].astype(str).unique() for g in genes_of(p)}
    held_genes = {g for u in units for g in genes_of(u["perturbation"])}
    graph_genes = set(train.var_names.astype(str)) | perturbed | held_genes
    pert_genes = {g for g in graph_genes if g in gene2go}  # = GEARS' PertData.pert_names
    adata, dropped = gears_adata(train, pert_genes)
    held_out = [gears_condition(u["perturbation"]) for u in units]
    seed_everything(seed)
    with tempfile.TemporaryDirectory(prefix="gears_") as tmp, contextlib.chdir(tmp):
        work = Path(tmp)
        gene_set = write_go_files(work, gene2go, sorted(graph_genes))
        pert_data, split = prepare_gears(
            work, task, adata, gene_set, held_out, seed, args.batch_size
        )
        t_train = time.perf_counter()
        model = train_gears(pert_data, args.epochs)
        train_s = time.perf_counter() - t_train
        deltas, skipped = predict_deltas(model, units)
        n_graph = len(model.pert_list)
    cells = predicted_cells(controls, deltas)
    meta = {
        "wall_s": round(time.perf_counter() - start, 1),
        "train_s": round(train_s, 1),
        "train_cells": int(adata.n_obs),
        "train_conditions": int(adata.obs["condition"].nunique()),
        "train_conditions_dropped_not_in_go": dropped,
        "go_graph_genes": n_graph,
        "val_rule": split["rule"],
        "val": split["val"],
        "units_predicted": sorted(deltas),
        "units_skipped": skipped,
        "rows_written": int(cells.n_obs),
    }
    return cells, meta


def settings(args) -> dict:
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        **MODEL,
        **TRAIN,
        "lr_schedule": "StepLR(step_size=1, gamma=0.5) (GEARS.train)",
        "model_selection": "best validation top-20 DE MSE over epochs (GEARS.train)",
        "preprocessing": "normalize_total(target_sum=1e4) + log1p on the training cells",
        "split_rule": (
            "custom split: train = all the fold's training cells; validation = a random 10% "
            "(>= 1) of the training perturbations where held-out perturbations are unseen, "
            "else a random 10% of each training perturbation's cells; never held-out cells"
        ),
        "deltas_to_cells": (
            "control + predicted change: GEARS.predict (mean over 300 sampled training "
            "controls) minus get_mean_control (mean of the log-normalised training control "
            "cells), added to each unit's control cells from controls.h5ad (log1p CP10k)"
        ),
        "covariate": (
            "none in GEARS: cell_type is one constant; mcfaline trains on the three lines "
            "pooled (A172: controls only) and the delta is added to A172's control cells"
        ),
        "go_files": (
            "offline: gene2go_all.pkl from org.Hs.eg.db 3.16 (direct annotations, no ND); "
            "perturbation graph = training genes + every perturbed gene of the fold "
            "(held-out included), GO graph by gears.utils.make_GO (Jaccard > 0.1)"
        ),
        "device": "cpu",
        "threads": args.threads,
    }


def run_task(task: str, args, gene2go: dict) -> None:
    out = args.preds / "gears" / f"seed{args.seed}" / "perturbation" / task
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "peer": "gears",
        "cell-gears": version("cell-gears"),
        "torch": version("torch"),
        "torch_geometric": version("torch-geometric"),
        "seed": args.seed,
    }
    if task in NOT_APPLICABLE:
        meta |= {"applicable": False, "reason": NOT_APPLICABLE[task]}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"gears {task}: not applicable", flush=True)
        return
    meta |= {"applicable": True, "settings": settings(args), "folds": {}}
    folds = sorted((args.splits / "perturbation" / task).glob("fold*"))
    for folder in folds:
        cells, fold_meta = run_fold(folder, task, gene2go, args.seed, args)
        cells.write_h5ad(out / f"{folder.name}.h5ad")
        meta["folds"][folder.name] = fold_meta
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        print(
            f"gears {task} {folder.name} seed {args.seed}: {fold_meta['wall_s']:.0f} s "
            f"(training {fold_meta['train_s']:.0f} s), {len(fold_meta['units_predicted'])} "
            f"units predicted, skipped: {fold_meta['units_skipped'] or 'none'}",
            flush=True,
        )


def main(argv=None) -> None:
    parser = runner_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--epochs", type=int, default=8, help="GEARS' README: 20 (GPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="GEARS' README: 32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--go-table", type=Path, default=GO_TABLE, help="gene -> GO ids (tsv.gz)")
    args = parser.parse_args(argv)
    args.splits, args.preds = args.splits.resolve(), args.preds.resolve()

    os.environ.setdefault("TQDM_DISABLE", "1")  # GEARS' progress bars, before it is imported
    import gears  # noqa: F401  (its import calls torch.manual_seed(0): before our seeding)
    import torch

    torch.set_num_threads(args.threads)
    gene2go = load_gene2go(args.go_table)
    for task in args.tasks:
        run_task(task, args, gene2go)


if __name__ == "__main__":
    main()

"""Label efficiency: does the PBMC reference pay off on a new data set with few labels?

    python benchmarks/pbmc_reference.py            # once: the reference (excludes the queries)
    python benchmarks/label_efficiency.py [--queries kang8 pbmc68k] [--k 5 10 25 100 all]
        [--draws 5] [--methods logreg_hvg knn_pca scfm_ref_probe scfm_ref_lora
        scanvi_scarches scarches_knn] [--zero-shot]

Queries (never pretrained on, see ``pbmc_reference.py``):

- ``kang8``: the control PBMCs of Kang donors 1244 and 1488 (``cluster_id``, 8 types);
- ``pbmc68k``: PBMC 68k reduced (``bulk_labels``, 10 types), 765 genes, of which the
  reference's vocabulary holds all but its data sets measure only some.

Each query is split once (stratified, seed 0) into a label pool and evaluation cells (half
each). For every ``k`` and draw (seeds 0..draws-1), ``k`` labelled cells per type are drawn
from the pool (all of a type's pool cells where it has fewer; ``all``: the whole pool, each
draw then a training seed), and
every method learns from those cells only and is scored on the evaluation cells: accuracy,
macro-F1, ECE (mean ± sd over draws) and seconds. Nothing is chosen on evaluation cells:
the methods' settings are those of ``annotation.py`` (chosen on its training splits), and
the highly variable genes of the linear baselines are selected on the pool's cells (their
counts, not their labels).

Methods: ``logreg_hvg`` and ``knn_pca`` (the package's baselines), and a
:class:`~scfm_adapt.model.CellAnnotator` adapted from the reference on the query's labelled
cells, aligned to the reference genes (the genes the query lacks masked):
``scfm_ref_probe`` (linear probe), ``scfm_ref_lora`` (LoRA) and ``scfm_ref_full`` (every
weight). ``scfm_scratch_lora`` is the same LoRA annotator on an SCFM trained from scratch
on the query's own cells (pool and evaluation cells, without labels, ``SCRATCH_EPOCHS``
with early stopping, as ``annotation.py`` pretrains): what the reference adds. The scArches rows
(``_scarches.py``) start from a scVI reference trained on the same combined files as the
PBMC reference: the query's cells (pool and evaluation cells, without labels, as scArches
maps a query) are mapped onto it once per query; ``scanvi_scarches`` then trains SCANVI from
the mapped model with the k labelled cells, ``scarches_knn`` a kNN on its latent.
``scfm_ref_knn`` maps the same cells onto the SCFM reference (``load_query_data``, a new
batch, an adapter trained without labels for ``QUERY_EPOCHS``) and runs the same kNN on its
embedding: the two references' query embeddings compared with one classifier.
``--zero-shot`` adds k = 0 on kang8 (with an annotator method, with a scArches method): an
annotator trained on the reference's own labelled cells (the 6 pretraining Kang control
donors) and applied with ``sfa.tl.transfer_labels`` ("Unknown" counted wrong), and the
reference SCANVI (trained on the same cells' labels) mapped to the evaluation cells
(``scanvi_scarches_transfer``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import _scarches
from _annotation import KANG_TEST_DONORS
from _common import quiet

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = RESULTS / "pbmc_reference"
KS = ("5", "10", "25", "100", "all")
METHODS = (
    "logreg_hvg",
    "knn_pca",
    "scfm_ref_probe",
    "scfm_ref_lora",
    "scfm_ref_full",
    "scfm_scratch_lora",
    "scanvi_scarches",
    "scarches_knn",
    "scfm_ref_knn",
)
SCARCHES = ("scanvi_scarches", "scarches_knn")
#: CellAnnotator settings per method (annotation.py's, chosen on its training splits).
ANNOTATOR = {
    "scfm_ref_probe": {"strategy": "linear_probe", "lr": 3e-3},
    "scfm_ref_lora": {"strategy": "lora", "lr": 1e-3, "rank": 8},
    "scfm_ref_full": {"strategy": "full", "lr": 5e-4},
    "scfm_scratch_lora": {"strategy": "lora", "lr": 1e-3, "rank": 8},
}
#: Epochs of the SCFM trained from scratch on the query (annotation.py's pretraining).
SCRATCH_EPOCHS = 60
#: Optimiser steps an annotator gets at least (few labelled cells make short epochs).
MIN_STEPS = 300
MIN_GENE_OVERLAP = 0.35
#: Epochs of the SCFM query mapping's adapter (scArches' query epochs are 100; SCFM's
#: epochs cost more, and the adapter is small).
QUERY_EPOCHS = 50


def scfm_query_embedding(cells, reference, seed: int = 0):
    """The SCFM reference's embedding of ``cells`` (no labels) mapped as a new batch with
    ``load_query_data`` and its adapter trained: ``(z, obs_names)``."""
    import scvi

    import scfm_adapt as sfa

    scvi.settings.seed = seed
    q = cells.copy()
    q.obs = q.obs.iloc[:, :0].copy()
    args = reference.registry_["setup_args"]
    if args.get("batch_key"):
        q.obs[args["batch_key"]] = "query"
    if args.get("labels_key"):  # a reference with labels: these cells' are not known
        q.obs[args["labels_key"]] = "Unknown"
    mapped = sfa.model.SCFM.load_query_data(
        q, reference, min_gene_overlap=MIN_GENE_OVERLAP, verbose=False
    )
    mapped.train(max_epochs=QUERY_EPOCHS, stage="vae", enable_progress_bar=False)
    return mapped.get_latent_representation(), mapped.adata.obs_names


def load_query(name: str):
    """``(pool, evaluation, label_key)`` of a query: a stratified half/half split."""
    from sklearn.model_selection import train_test_split

    import scfm_adapt as sfa

    if name == "kang8":
        a = sfa.datasets.kang2018_ctrl()
        a = a[np.isin(a.obs["sample_id"].astype(str), KANG_TEST_DONORS)].copy()
        key = "cluster_id"
    elif name == "pbmc68k":
        a, key = sfa.datasets.pbmc68k(), "bulk_labels"
    else:
        raise ValueError(f"Unknown query {name!r}; choose kang8 or pbmc68k.")
    a.obs[key] = a.obs[key].astype(str).astype("category")
    pool, ev = train_test_split(
        np.arange(a.n_obs), test_size=0.5, stratify=a.obs[key].to_numpy(), random_state=0
    )
    return a[np.sort(pool)].copy(), a[np.sort(ev)].copy(), key


def draw(pool, key: str, k: str, seed: int):
    """``k`` labelled cells per type of ``pool`` (every cell with ``k == "all"``)."""
    if k == "all":
        return pool
    rng = np.random.default_rng(seed)
    labels = pool.obs[key].to_numpy()
    picks = [
        rng.choice(
            np.flatnonzero(labels == c), size=min(int(k), (labels == c).sum()), replace=False
        )
        for c in np.unique(labels)
    ]
    return pool[np.sort(np.concatenate(picks))].copy()


def annotator(labelled, evaluation, key: str, reference, method: str, seed: int):
    """A CellAnnotator from the reference trained on ``labelled``: ``(proba, classes)``."""
    import scvi

    import scfm_adapt as sfa
    from scfm_adapt.data import align_genes

    scvi.settings.seed = seed
    opts = dict(ANNOTATOR[method])
    lr, strategy = opts.pop("lr"), opts.pop("strategy")
    train = align_genes(labelled, reference.var_names_, min_overlap=MIN_GENE_OVERLAP)
    test = align_genes(evaluation, reference.var_names_, min_overlap=MIN_GENE_OVERLAP)
    sfa.model.CellAnnotator.setup_anndata(train, labels_key=key)
    ann = sfa.model.CellAnnotator(train, pretrained=reference, strategy=strategy, **opts)
    batches = math.ceil(0.9 * train.n_obs / 128)
    epochs = max(40, math.ceil(MIN_STEPS / batches))
    ann.train(max_epochs=epochs, lr=lr, enable_progress_bar=False)
    _, probs = ann.predict_details(test)
    return probs.to_numpy(), list(probs.columns)


def scratch_model(cells, seed: int = 0):
    """An SCFM trained on ``cells`` alone (no labels), stage 1, as annotation.py does."""
    import scvi

    import scfm_adapt as sfa

    scvi.settings.seed = seed
    a = cells.copy()
    a.obs = a.obs.iloc[:, :0].copy()
    sfa.model.SCFM.setup_anndata(a)
    model = sfa.model.SCFM(a)
    model.train(
        max_epochs=SCRATCH_EPOCHS, stage="vae", early_stopping=True, enable_progress_bar=False
    )
    return model


def zero_shot(evaluation, key: str, reference, seed: int, folder: Path = REFERENCE) -> dict:
    """The reference's own annotator (LoRA, on its labelled Kang control cells, read
    through their file's gene panel) applied to the query by transfer_labels; "Unknown"
    and wrong labels count as errors."""
    import anndata as ad
    import scvi

    import scfm_adapt as sfa
    from scfm_adapt.metrics import classification_metrics

    scvi.settings.seed = seed
    data = ad.read_h5ad(folder / "data.h5ad", backed="r")
    train = sfa.data.select_panel(data, "kang_ctrl")  # its genes; the others masked
    data.file.close()
    train.obs = train.obs[["cell_type"]].astype(str).astype("category")
    sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(train, pretrained=reference, strategy="lora", rank=8)
    ann.train(max_epochs=20, lr=1e-3, enable_progress_bar=False)
    q = evaluation.copy()
    truth = q.obs.pop(key).astype(str).to_numpy()
    sfa.tl.transfer_labels(q, ann, min_gene_overlap=MIN_GENE_OVERLAP)
    labels = q.obs["scfm_label"].astype(str).to_numpy()
    probs = q.obsm["scfm_label_probs"]
    scores = classification_metrics(truth, probs.to_numpy(), list(probs.columns))
    return {
        "accuracy": float((labels == truth).mean()),
        "macro_f1": scores["macro_f1"],
        "ece": scores["ece"],
        "unknown": float((labels == "Unknown").mean()),
    }


def run(
    query: str, ks, draws: int, methods, reference, zero: bool, folder: Path, arches=None
) -> pd.DataFrame:
    """Every method's rows on one query (``arches``: the scArches reference pair of
    :func:`_scarches.reference`, for its methods)."""
    import anndata as ad

    import scfm_adapt as sfa
    from scfm_adapt.metrics import classification_metrics

    pool, ev, key = load_query(query)
    hvgs = sfa.baselines.highly_variable_genes(pool)  # counts of the pool, not its labels
    truth = ev.obs[key].astype(str).to_numpy()
    rows = []
    scfm_zero = zero and any(m in ANNOTATOR for m in methods)
    for d in range(draws if scfm_zero else 0):  # the reference annotator's training seeds
        t0 = time.perf_counter()
        z = zero_shot(ev, key, reference, d, folder)
        rows.append({"query": query, "k": "0", "draw": d, "method": "scfm_ref_transfer",
                     **z, "seconds": time.perf_counter() - t0})  # fmt: skip
    mapped, map_seconds = None, 0.0
    if arches is not None:
        for d in range(draws if zero else 0):  # the reference SCANVI, mapped per seed
            t0 = time.perf_counter()
            proba, classes = _scarches.zero_shot(ev, arches[1], d)
            s = classification_metrics(truth, proba, classes)
            rows.append({"query": query, "k": "0", "draw": d,
                         "method": "scanvi_scarches_transfer", "accuracy": s["accuracy"],
                         "macro_f1": s["macro_f1"], "ece": s["ece"],
                         "seconds": time.perf_counter() - t0})  # fmt: skip
        if any(m in SCARCHES for m in methods):  # the query mapped once, without labels
            t0 = time.perf_counter()
            mapped = _scarches.map_query(ad.concat([pool, ev]), arches[0])
            map_seconds = time.perf_counter() - t0
    scratch, scratch_seconds = None, 0.0
    if "scfm_scratch_lora" in methods:  # the query's own SCFM, without labels
        t0 = time.perf_counter()
        scratch = scratch_model(ad.concat([pool, ev]))
        scratch_seconds = time.perf_counter() - t0
    scfm_z, scfm_seconds = None, 0.0
    if "scfm_ref_knn" in methods:  # the same cells onto the SCFM reference
        t0 = time.perf_counter()
        scfm_z = scfm_query_embedding(ad.concat([pool, ev]), reference)
        scfm_seconds = time.perf_counter() - t0
    for k in ks:
        for d in range(draws):  # with k = "all" the same cells, other training seeds
            labelled = draw(pool, key, k, d)
            for method in methods:
                t0 = time.perf_counter()
                if method == "logreg_hvg":
                    r = sfa.baselines.logreg_hvg(labelled, ev, key, genes=hvgs)
                    proba, classes = r.proba, r.classes
                elif method == "knn_pca":
                    k_nn = min(15, labelled.n_obs - 1)
                    r = sfa.baselines.knn_pca(labelled, ev, key, genes=hvgs, k=k_nn, seed=d)
                    proba, classes = r.proba, r.classes
                elif method in SCARCHES:  # its seconds include the query's mapping
                    t0 -= map_seconds
                    names, y = labelled.obs_names, labelled.obs[key].astype(str)
                    if method == "scanvi_scarches":
                        proba, classes = _scarches.few_labels(mapped, names, y, ev.obs_names, d)
                    else:
                        proba, classes = _scarches.latent_knn(mapped, names, y, ev.obs_names)
                elif method == "scfm_ref_knn":  # its seconds include the query's mapping
                    t0 -= scfm_seconds
                    z, obs = scfm_z
                    names, y = labelled.obs_names, labelled.obs[key].astype(str)
                    proba, classes = _scarches.embedding_knn(z, obs, names, y, ev.obs_names)
                elif method == "scfm_scratch_lora":  # its seconds include the pretraining
                    t0 -= scratch_seconds
                    proba, classes = annotator(labelled, ev, key, scratch, method, d)
                else:
                    proba, classes = annotator(labelled, ev, key, reference, method, d)
                s = classification_metrics(truth, proba, classes)
                rows.append({
                    "query": query, "k": k, "draw": d, "method": method,
                    "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "ece": s["ece"],
                    "seconds": time.perf_counter() - t0, "n_labelled": labelled.n_obs,
                })  # fmt: skip
                print(f"{query} k={k} draw {d} {method}: acc {s['accuracy']:.3f} "
                      f"macro-F1 {s['macro_f1']:.3f} ECE {s['ece']:.3f}", flush=True)  # fmt: skip
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    def ms(x):
        return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}"

    g = df.groupby(["query", "k", "method"], sort=False)
    out = g.agg(
        accuracy=("accuracy", ms), macro_f1=("macro_f1", ms), ece=("ece", ms),
        seconds=("seconds", "mean"), draws=("draw", "count"),
    )  # fmt: skip
    out["seconds"] = out["seconds"].round(1)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", nargs="+", default=["kang8", "pbmc68k"])
    parser.add_argument("--k", nargs="+", default=list(KS), choices=KS)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--zero-shot", action="store_true", help="k = 0 on kang8")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--out", type=Path, default=RESULTS / "label_efficiency.csv")
    args = parser.parse_args(argv)
    quiet()
    import torch

    import scfm_adapt as sfa

    torch.set_num_threads(max(1, int(__import__("os").environ.get("OMP_NUM_THREADS", "2"))))
    reference, arches = None, None
    if any(m.startswith("scfm") for m in args.methods):
        if not (args.reference / "model").exists():
            raise SystemExit(f"No reference at {args.reference}; run pbmc_reference.py first.")
        reference = sfa.model.SCFM.load(args.reference / "model")
    if any(m in SCARCHES for m in args.methods):
        if not (args.reference / "data.h5ad").exists():
            raise SystemExit(f"No data.h5ad in {args.reference}; run pbmc_reference.py first.")
        t0 = time.perf_counter()
        arches = _scarches.reference(args.reference)
        print(f"scArches reference (scVI + SCANVI): {time.perf_counter() - t0:.0f} s")
    frames = []
    for q in args.queries:
        zero = args.zero_shot and q == "kang8"
        frames.append(
            run(q, args.k, args.draws, args.methods, reference, zero, args.reference, arches)
        )
    df = pd.concat(frames)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    pd.set_option("display.width", 200)
    print(summary(df).to_string())


if __name__ == "__main__":
    sys.exit(main())

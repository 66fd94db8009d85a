"""Latent design on validation donors only: how the latent's settings change the embedding.

Kang 2018 control PBMCs, the *train* donors of ``benchmarks/embedding.py`` only (its two
test donors are never loaded): the models train on all of them, and the last two of them
(sorted) are the validation donors. Every setting below is chosen on these figures, never
on the test donors.

Per setting (``--configs``): the latent's use (:meth:`SCFM.get_latent_statistics`: noise
against signal, KL, active dimensions, the share of the signal between cell types);
kNN label transfer from the other train donors to the validation donors (k=15);
k-means NMI / ARI of the validation cells' embedding with as many clusters as cell types,
and its cell-type silhouette rescaled to [0, 1] (the bio-conservation figures of scIB that
kNN accuracy hides); donor mixing; the held-out NLL of the 10% test cells of the split.
scVI and PCA give the same figures for reference.

``python benchmarks/latent_design.py --configs default kl0.1 kl0.01 --epochs 40``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _common import donor_split, quiet

LABELS_KEY, BATCH_KEY = "cluster_id", "sample_id"
RESULTS = Path(__file__).parent / "results"

#: name -> (SCFM keyword arguments, plan keyword arguments)
CONFIGS = {
    "default": ({}, {}),
    "kl0.1": ({}, {"max_kl_weight": 0.1}),
    "kl0.01": ({}, {"max_kl_weight": 0.01}),
    "kl0.1-mean": ({"prior_target": "mean"}, {"max_kl_weight": 0.1}),
    "kl0.1-4x16": ({"n_tokens": 4}, {"max_kl_weight": 0.1}),
    "kl0.1-8x8": ({"token_dim": 8}, {"max_kl_weight": 0.1}),
    "kl0.1-16x8": ({"n_tokens": 16, "token_dim": 8}, {"max_kl_weight": 0.1}),
    "v": ({"prediction": "v"}, {}),
}
#: Settings of the prior only: ``benchmarks/prior_design.py`` compares them; here their VAE
#: would be that of ``kl0.1`` / ``default`` again.
PRIOR_ONLY = ("kl0.1-mean", "v")


def load(seed: int):
    import scfm_adapt as sfa

    adata = sfa.datasets.kang2018_ctrl()
    donors = adata.obs[BATCH_KEY].astype(str).to_numpy()
    train_donors, _ = donor_split(donors)  # the benchmark's test donors are dropped here
    adata = adata[np.isin(donors, train_donors)].copy()
    donors = adata.obs[BATCH_KEY].astype(str).to_numpy()
    ref_donors, val_donors = donor_split(donors)
    return adata, np.isin(donors, ref_donors), np.isin(donors, val_donors)


def embedding_figures(emb, adata, ref, val, seed: int) -> dict:
    from scfm_adapt.metrics import batch_mixing_entropy, knn_transfer, label_clustering

    y = adata.obs[LABELS_KEY].astype(str).to_numpy()
    knn = knn_transfer(emb[ref], y[ref], emb[val], y[val], k=15)
    mix = batch_mixing_entropy(emb, adata.obs[BATCH_KEY].to_numpy(), y, k=50)
    return {
        "knn_accuracy": knn["accuracy"],
        "knn_macro_f1": knn["macro_f1"],
        **label_clustering(emb[val], y[val], seed=seed),
        "donor_mixing": mix["score"],
    }


def fit_scfm(adata, name: str, epochs: int, seed: int):
    import scvi

    import scfm_adapt as sfa

    model_kwargs, plan_kwargs = CONFIGS[name]
    scvi.settings.seed = seed
    a = adata.copy()
    sfa.model.SCFM.setup_anndata(a, batch_key=BATCH_KEY)
    model = sfa.model.SCFM(a, **model_kwargs)
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        stage="vae",
        train_size=0.8,
        validation_size=0.1,
        batch_size=128,
        early_stopping=True,
        plan_kwargs=plan_kwargs,
        enable_progress_bar=False,
    )
    seconds = time.perf_counter() - t0
    stats = model.get_latent_statistics(labels_key=LABELS_KEY, batch_key=BATCH_KEY)
    nll = model.get_reconstruction_error(indices=model.test_indices)["reconstruction_loss"]
    extra = {
        "heldout_nll": float(nll),
        "epochs": len(model.history["vae"]["elbo_train"]),
        "train_s": seconds,
        **{f"latent_{k}": float(v) for k, v in stats.loc["all"].items()},
    }
    return model.get_latent_representation(), extra


def fit_scvi(adata, epochs: int, seed: int):
    import scvi

    scvi.settings.seed = seed
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key=BATCH_KEY)
    model = scvi.model.SCVI(a, n_latent=10)
    model.train(
        max_epochs=epochs,
        train_size=0.8,
        validation_size=0.1,
        batch_size=128,
        early_stopping=True,
        enable_progress_bar=False,
    )
    nll = model.get_reconstruction_error(indices=model.test_indices)["reconstruction_loss"]
    return model.get_latent_representation(), {"heldout_nll": float(nll)}


def fit(name: str, adata, ref, val, epochs: int, seed: int):
    """The embedding of every cell under model ``name``, and its extra figures."""
    if name == "scVI":
        return fit_scvi(adata, epochs, seed)
    if name == "PCA":
        from scfm_adapt.baselines import pca_embedding

        return pca_embedding(adata, ref | val, 50, 2000, seed), {}
    return fit_scfm(adata, name, epochs, seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        nargs="*",
        default=["default", "kl0.1"],
        choices=[c for c in CONFIGS if c not in PRIOR_ONLY],
    )
    p.add_argument("--references", nargs="*", default=["scvi", "pca"], choices=["scvi", "pca"])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "latent_design.json")
    args = p.parse_args()

    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    quiet()
    rows = []
    for seed in args.seeds:
        adata, ref, val = load(seed)
        names = [*args.configs, *(("scVI",) if "scvi" in args.references else ())]
        names += ["PCA"] if "pca" in args.references else []
        for name in names:
            emb, extra = fit(name, adata, ref, val, args.epochs, seed)
            row = {"config": name, "seed": seed, **embedding_figures(emb, adata, ref, val, seed)}
            row.update(extra)
            rows.append(row)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            print(json.dumps(shown), flush=True)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(table.to_json(orient="records", indent=1))
    summary = table.drop(columns="seed").groupby("config", sort=False).agg(["mean", "std"])
    pd.set_option("display.width", 250)
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()

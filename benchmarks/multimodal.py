"""Multimodal benchmark: SCFM on MuData beside totalVI and simple baselines, same splits.

Tasks (seed 0), on the real data in ``$SCFM_ADAPT_DATA`` / ``../shared/data``:

- ``citeseq``: the two 10x PBMC CITE-seq sets (400 cells, 2,000 highly variable genes, 29
  proteins; the 10k set measured 14 of them). 20% of each batch's cells are held out: their
  proteins are hidden from training (all-zero rows, which SCFM masks; totalVI gets them as
  extra batches with an empty panel, its documented way to impute proteins). Both models
  still see those cells' RNA (transductive, the same for both). Then each model predicts the
  held-out cells' proteins from RNA alone.
  Score: Pearson, per protein measured in the cell's batch, between log1p(predicted mean)
  and log1p(observed ADT counts) over the held-out cells of that batch; mean and median over
  (batch, protein). Baselines on the same split: ridge regression and 15-NN regression from
  the 50 RNA principal components (log-normalised HVGs) to log1p protein, fitted on the
  training cells of the batch.
  Also: the held-out protein NLL per cell under SCFM with the ``"mixture"`` and ``"nb"``
  protein likelihoods (why the mixture is the default).
- ``multiome``: 10x multiome (1,000 cells, 45 genes, 174 peaks), no held-out cells.

Neighbourhood agreement (``sfa.metrics.neighbor_agreement``, 15 neighbours) of each joint
embedding with each single modality's own embedding (RNA: PCA of log-normalised genes;
protein: PCA of CLR of the 14 proteins both panels share; ATAC: LSI, TF-IDF + SVD without
its first component), beside a simple joint baseline: the standardised single-modality
embeddings concatenated; the first row is the first modality's own embedding (how much the
modalities agree with each other). Every model trains the same number of epochs without
early stopping. Timings are wall-clock seconds on this machine.

Usage::

    python benchmarks/multimodal.py [--epochs 300] [--tasks citeseq multiome]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import dense, markdown_table, quiet
from scfm_adapt.baselines import lognorm_genes

RESULTS = Path(__file__).parent / "results"
K = 15


def pca(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA

    n = min(n, x.shape[1] - 1, x.shape[0] - 1)
    return PCA(n_components=n, random_state=seed).fit_transform(x).astype(np.float32)


def clr(y: np.ndarray) -> np.ndarray:
    ly = np.log1p(y)
    return ly - ly.mean(1, keepdims=True)


def lsi(x: np.ndarray, n: int = 20) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD

    tf = x / np.maximum(x.sum(1, keepdims=True), 1)
    idf = np.log1p(x.shape[0] / np.maximum((x > 0).sum(0), 1))
    z = TruncatedSVD(n_components=n + 1, random_state=0).fit_transform(np.log1p(tf * 1e4) * idf)
    return z[:, 1:].astype(np.float32)


def concat_baseline(*embs: np.ndarray) -> np.ndarray:
    return np.concatenate([(e - e.mean(0)) / (e.std() + 1e-8) for e in embs], 1)


def agreement_rows(joint: dict[str, np.ndarray], single: dict[str, np.ndarray]) -> list[list]:
    import scfm_adapt as sfa

    first, *rest = single
    rows = [
        [
            f"{first} itself",
            "1.000",
            *(f"{sfa.metrics.neighbor_agreement(single[first], single[r], K):.3f}" for r in rest),
        ]
    ]
    for name, emb in joint.items():
        rows.append(
            [name] + [f"{sfa.metrics.neighbor_agreement(emb, s, K):.3f}" for s in single.values()]
        )
    return rows


def protein_pearson(pred: np.ndarray, obs: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Per-protein Pearson of log1p(pred) vs log1p(obs); NaN where unmeasured or constant."""
    out = np.full(obs.shape[1], np.nan)
    lp, lo = np.log1p(np.maximum(pred, 0)), np.log1p(obs)
    for j in np.where(measured)[0]:
        if lo[:, j].std() > 0 and lp[:, j].std() > 0:
            out[j] = np.corrcoef(lp[:, j], lo[:, j])[0, 1]
    return out


def train_scfm(mdata, modalities, epochs, **kwargs):
    import scfm_adapt as sfa

    sfa.model.SCFM.setup_mudata(mdata, modalities=modalities, batch_key=kwargs.pop("batch", None))
    model = sfa.model.SCFM(mdata, **kwargs)
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, stage="vae", early_stopping=False, enable_progress_bar=False)
    return model, time.perf_counter() - t0


def heldout_protein_nll(model, mdata, indices) -> float:
    """Mean NLL per cell of the held-out cells' observed proteins, tokens from RNA alone."""
    import torch
    from scvi import REGISTRY_KEYS

    from scfm_adapt.module import MODULE_KEYS
    from scfm_adapt.module._multimodal import MODALITY_KEYS

    total, n = 0.0, 0
    with torch.inference_mode():
        for t in model._batches(mdata, indices, 128):
            inf = model.module.inference(**model.module._get_inference_input(t), given=("rna",))
            conds = model.module.conditions(t)
            px = model.module.decode_modalities(inf[MODULE_KEYS.QZ].loc, {}, conds)["protein"]
            lp = px.log_prob(t[MODALITY_KEYS["protein"]])
            lp = lp * model.module._measured("protein", t[REGISTRY_KEYS.BATCH_KEY])
            total += -lp.sum().item()
            n += lp.shape[0]
    return total / n


def citeseq(epochs: int, seed: int = 0) -> None:
    import scanpy as sc
    import scvi
    from sklearn.linear_model import Ridge
    from sklearn.neighbors import KNeighborsRegressor

    import scfm_adapt as sfa

    mdata = sfa.datasets.citeseq_mudata()
    rna = mdata.mod["rna"]
    hvg = sc.pp.highly_variable_genes(
        rna, n_top_genes=2000, flavor="seurat_v3", batch_key=None, inplace=False
    )["highly_variable"].to_numpy()
    import mudata as md

    full = md.MuData({"rna": rna[:, hvg].copy(), "protein": mdata.mod["protein"].copy()})
    full.obs["batch"] = mdata.obs["batch"].to_numpy()
    batch = full.obs["batch"].astype(str).to_numpy()
    y = dense(full.mod["protein"].X)
    rng = np.random.default_rng(seed)
    held = np.zeros(full.n_obs, bool)
    for b in np.unique(batch):
        idx = np.where(batch == b)[0]
        held[rng.choice(idx, size=round(0.2 * len(idx)), replace=False)] = True
    measured = {b: y[batch == b].sum(0) > 0 for b in np.unique(batch)}
    print(f"citeseq: {full.n_obs} cells ({held.sum()} held out), {full.mod['rna'].n_vars} genes")

    def masked_copy():
        m = md.MuData({"rna": full.mod["rna"].copy(), "protein": full.mod["protein"].copy()})
        m.mod["protein"].X[held] = 0
        m.obs["batch"] = batch
        return m

    preds, timings, nll = {}, {}, {}
    embeds = {}
    for lik in ("mixture", "nb"):
        train = masked_copy()
        scvi.settings.seed = seed
        model, t_train = train_scfm(
            train,
            {"rna": "rna", "protein": "protein"},
            epochs,
            batch="batch",
            protein_likelihood=lik,
        )
        t0 = time.perf_counter()
        p = model.get_normalized_expression(
            full,
            indices=np.where(held)[0],
            modality="protein",
            given=("rna",),
            protein_background=True,
            return_numpy=True,
        )
        t_pred = time.perf_counter() - t0
        preds[f"scfm ({lik})"] = p
        nll[lik] = heldout_protein_nll(model, full, np.where(held)[0])
        t0 = time.perf_counter()
        embeds[f"scfm ({lik})"] = model.get_latent_representation(full)
        timings[f"scfm ({lik})"] = (t_train, time.perf_counter() - t0, t_pred)

    # totalVI: held-out cells as extra batches whose panel is empty (all zeros).
    scvi.settings.seed = seed
    tv = masked_copy()
    tv.mod["rna"].obs["tv_batch"] = np.where(
        held, np.char.add(batch.astype(str), "_heldout"), batch
    )
    tv.update()
    scvi.model.TOTALVI.setup_mudata(
        tv,
        batch_key="tv_batch",
        modalities={"rna_layer": "rna", "protein_layer": "protein", "batch_key": "rna"},
    )
    totalvi = scvi.model.TOTALVI(tv)
    t0 = time.perf_counter()
    totalvi.train(max_epochs=epochs, early_stopping=False, enable_progress_bar=False)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = np.zeros((held.sum(), y.shape[1]), np.float32)
    hidx = np.where(held)[0]
    for b in np.unique(batch):
        sel = batch[hidx] == b
        _, prot = totalvi.get_normalized_expression(
            tv,
            indices=hidx[sel],
            transform_batch=b,
            include_protein_background=True,
            n_samples=25,
            return_mean=True,
        )
        pred[sel] = np.asarray(prot)
    t_pred = time.perf_counter() - t0
    preds["totalVI"] = pred
    t0 = time.perf_counter()
    embeds["totalVI"] = totalvi.get_latent_representation(tv)
    timings["totalVI"] = (t_train, time.perf_counter() - t0, t_pred)

    # Simple baselines from RNA principal components.
    pcs = pca(lognorm_genes(full.mod["rna"]), 50)
    for name, make in {
        "ridge on RNA PCs": lambda: Ridge(alpha=1.0),
        "15-NN on RNA PCs": lambda: KNeighborsRegressor(n_neighbors=15),
    }.items():
        pred = np.zeros((held.sum(), y.shape[1]), np.float32)
        for b in np.unique(batch):
            tr = (~held) & (batch == b)
            te = batch[hidx] == b
            reg = make().fit(pcs[tr], np.log1p(y[tr]))
            pred[te] = np.expm1(reg.predict(pcs[hidx[te]]))
        preds[name] = pred

    rows = []
    for name, p in preds.items():
        scores = []
        for b in np.unique(batch):
            te = batch[hidx] == b
            scores.append(protein_pearson(p[te], y[hidx[te]], measured[b]))
        s = np.concatenate(scores)
        s = s[np.isfinite(s)]
        t = timings.get(name)
        rows.append(
            [
                name,
                f"{s.mean():.3f}",
                f"{np.median(s):.3f}",
                str(len(s)),
                f"{t[0]:.1f}" if t else "-",
                f"{t[2]:.2f}" if t else "-",
            ]
        )
    print("\nRNA → protein on held-out cells (per-protein Pearson of log1p values)")
    print(
        markdown_table(
            ["method", "mean r", "median r", "n (batch, protein)", "train s", "predict s"], rows
        )
    )
    print(
        f"\nheld-out protein NLL per cell from RNA alone: mixture {nll['mixture']:.1f}, "
        f"nb {nll['nb']:.1f}"
    )

    shared = np.all([measured[b] for b in measured], 0)
    single = {
        "RNA (PCA)": pcs,
        "protein (CLR PCA)": pca(clr(y[:, shared]), 10),
    }
    joint = dict(embeds)
    joint["concat PCA baseline"] = concat_baseline(*single.values())
    print(f"\nneighbour agreement ({K}-NN) of joint embeddings with each modality, all cells")
    print(markdown_table(["embedding", *single], agreement_rows(joint, single)))
    print("embed s: " + ", ".join(f"{k} {v[1]:.2f}" for k, v in timings.items()))
    RESULTS.mkdir(exist_ok=True)
    pd.DataFrame(
        rows, columns=["method", "mean_r", "median_r", "n", "train_s", "predict_s"]
    ).to_csv(RESULTS / "multimodal_citeseq.csv", index=False)


def multiome(epochs: int, seed: int = 0) -> None:
    import scvi

    import scfm_adapt as sfa

    mdata = sfa.datasets.multiome()
    scvi.settings.seed = seed
    model, t_train = train_scfm(mdata, {"rna": "rna", "atac": "atac"}, epochs)
    t0 = time.perf_counter()
    z = model.get_latent_representation(mdata)
    t_embed = time.perf_counter() - t0
    x_rna = lognorm_genes(mdata.mod["rna"])
    x_atac = dense(mdata.mod["atac"].X)
    single = {"RNA (PCA)": pca(x_rna, 20), "ATAC (LSI)": lsi(x_atac, 20)}
    joint = {"scfm": z, "concat PCA/LSI baseline": concat_baseline(*single.values())}
    n_missing = int((x_atac.sum(1) == 0).sum())
    print(
        f"\nmultiome: {mdata.n_obs} cells ({n_missing} without ATAC counts, masked), "
        f"{x_rna.shape[1]} genes, {x_atac.shape[1]} peaks; train {t_train:.1f} s, "
        f"embed {t_embed:.2f} s"
    )
    print(markdown_table(["embedding", *single], agreement_rows(joint, single)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--tasks", nargs="+", default=["citeseq", "multiome"])
    args = parser.parse_args(argv)
    quiet()
    for task in args.tasks:
        {"citeseq": citeseq, "multiome": multiome}[task](args.epochs)


if __name__ == "__main__":
    main()

"""Generation benchmark: label-conditional SCFM against simple generators, on held-out cells.

Data: ``kang2018_ctrl_8donors`` (12,261 PBMC, 1,287 genes, 8 cell types in ``cluster_id``),
split 80/20 stratified by cell type (``train_test_split(random_state=0)``). Every
generator sees the training cells only and produces a set with the test set's cell-type
composition; each set is compared with the held-out 20% by :mod:`scfm_adapt.metrics`
(pooled, per cell type and macro over types).

Generators
----------
``real floor``
    Disjoint real training cells of the test composition: what "indistinguishable" scores.
``per-type NB``
    An independent negative binomial per gene and cell type (method of moments on the
    training counts): right marginals, no co-expression.
``scVI prior``
    scVI with the cell type as its batch covariate: ``z ~ N(0, I)``, decoded under the
    type, library sizes drawn from training cells of that type.
``scVI posterior predictive``
    Counts resampled from scVI's posterior of the floor's real training cells: a
    reconstruction of real cells, a near-real reference rather than a label-only
    generator.
``SCFM``
    Stage 1 + stage 2 on the training cells with ``labels_key="cluster_id"``; cells
    generated from the label alone (tokens from the DiT, library sizes from the library
    model, counts from the NB decoder), at guidance 1 and at the guidance that scores best
    against a *validation* set of training cells (disjoint from the floor's), never the
    test cells.

Usage::

    python benchmarks/generation.py                  # trains (cached in benchmarks/results/)
    python benchmarks/generation.py --epochs 60 --epochs-prior 150
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

from _common import environment_info, quiet

RESULTS = Path(__file__).parent / "results"
LABEL = "cluster_id"
GUIDANCE_GRID = (1.0, 1.5, 2.0, 3.0)
COLUMNS = {
    "c2st_knn_accuracy": "C2ST kNN acc",
    "wasserstein": "W2",
    "precision": "precision",
    "recall": "recall",
    "label_fidelity": "label fidelity",
    "c2st_logistic_auc": "C2ST logit AUC",
    "mmd": "MMD",
    "energy": "energy",
    "mean_pearson": "r mean",
    "variance_pearson": "r var",
    "zero_fraction_pearson": "r zeros",
}


def load(seed: int = 0):
    from sklearn.model_selection import train_test_split

    import scfm_adapt as sfa

    adata = sfa.datasets.kang2018_ctrl()
    adata.obs[LABEL] = adata.obs[LABEL].astype(str).astype("category")
    idx = np.arange(adata.n_obs)
    tr, te = train_test_split(
        idx, test_size=0.2, stratify=adata.obs[LABEL].to_numpy(), random_state=seed
    )
    return adata[np.sort(tr)].copy(), adata[np.sort(te)].copy()


def composition_sample(pool, counts: pd.Series, rng, exclude=None) -> np.ndarray:
    """Indices of ``pool`` cells with ``counts[type]`` cells of each type."""
    labels = pool.obs[LABEL].astype(str).to_numpy()
    taken = np.zeros(pool.n_obs, bool)
    if exclude is not None:
        taken[exclude] = True
    out = []
    for t, k in counts.items():
        cand = np.flatnonzero((labels == t) & ~taken)
        out.append(rng.choice(cand, int(k), replace=False))
    return np.sort(np.concatenate(out))


def nb_per_type(train, counts: pd.Series, rng):
    import anndata as ad
    from scipy import sparse

    x_all = train.X.toarray() if sparse.issparse(train.X) else np.asarray(train.X)
    labels = train.obs[LABEL].astype(str).to_numpy()
    blocks, obs = [], []
    for t, k in counts.items():
        x = x_all[labels == t]
        mu, var = x.mean(0), x.var(0, ddof=1)
        over = var > mu + 1e-8
        theta = np.where(over, mu**2 / np.maximum(var - mu, 1e-8), 1e8)
        p = theta / (theta + np.maximum(mu, 1e-12))
        sample = rng.negative_binomial(np.maximum(theta, 1e-8), p, size=(int(k), len(mu)))
        sample[:, mu == 0] = 0
        blocks.append(sample.astype(np.float32))
        obs += [t] * int(k)
    return ad.AnnData(
        sparse.csr_matrix(np.concatenate(blocks)),
        obs=pd.DataFrame({LABEL: pd.Categorical(obs)}, index=[f"nb{i}" for i in range(len(obs))]),
        var=pd.DataFrame(index=train.var_names),
    )


def train_scvi(train, epochs: int, seed: int):
    import scvi

    scvi.settings.seed = seed
    path = RESULTS / f"generation_scvi_{epochs}_seed{seed}"
    data = train.copy()
    scvi.model.SCVI.setup_anndata(data, batch_key=LABEL)
    if path.exists():
        return scvi.model.SCVI.load(str(path), adata=data), 0.0
    t0 = time.perf_counter()
    model = scvi.model.SCVI(data)
    model.train(max_epochs=epochs, enable_progress_bar=False, early_stopping=True)
    wall = time.perf_counter() - t0
    model.save(str(path), overwrite=True)
    return model, wall


def scvi_prior(model, train, counts: pd.Series, rng):
    import anndata as ad
    import torch
    from scipy import sparse

    cats = list(model.adata_manager.get_state_registry("batch").categorical_mapping)
    labels = train.obs[LABEL].astype(str).to_numpy()
    lib_all = np.asarray(train.X.sum(1)).ravel()
    codes, libs, obs = [], [], []
    for t, k in counts.items():
        pool = lib_all[labels == t]
        libs.append(rng.choice(pool, int(k)))
        codes += [cats.index(t)] * int(k)
        obs += [t] * int(k)
    n = len(codes)
    module = model.module.eval()
    with torch.inference_mode():
        # The sampling noise is the same for every seed (as the DDPM row's below): the
        # spread over seeds is that of the split and the training.
        torch.manual_seed(0)
        z = torch.randn(n, module.n_latent)
        library = torch.as_tensor(np.log(np.concatenate(libs)), dtype=torch.float32)[:, None]
        batch = torch.as_tensor(codes)[:, None]
        out = module.generative(z=z, library=library, batch_index=batch)
        x = out["px"].sample().numpy()
    return ad.AnnData(
        sparse.csr_matrix(x.astype(np.float32)),
        obs=pd.DataFrame({LABEL: pd.Categorical(obs)}, index=[f"sp{i}" for i in range(n)]),
        var=pd.DataFrame(index=train.var_names),
    )


def scvi_posterior(model, train, idx):
    import anndata as ad
    from scipy import sparse

    x = model.posterior_predictive_sample(indices=idx)
    x = x.todense() if hasattr(x, "todense") else x
    x = np.asarray(x, dtype=np.float32)
    return ad.AnnData(
        sparse.csr_matrix(x),
        obs=train.obs.iloc[idx][[LABEL]].copy(),
        var=pd.DataFrame(index=train.var_names),
    )


def train_scfm(train, epochs: int, epochs_prior: int, seed: int):
    import scvi

    import scfm_adapt as sfa

    scvi.settings.seed = seed
    path = RESULTS / f"generation_scfm_{epochs}_{epochs_prior}_seed{seed}"
    data = train.copy()
    if path.exists():
        return sfa.model.SCFM.load(path, adata=data), 0.0
    sfa.model.SCFM.setup_anndata(data, labels_key=LABEL)
    model = sfa.model.SCFM(data)
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        max_epochs_prior=epochs_prior,
        enable_progress_bar=False,
        early_stopping=True,
    )
    wall = time.perf_counter() - t0
    model.save(path, overwrite=True)
    return model, wall


def summarise(frame: pd.DataFrame) -> dict:
    out = {}
    for row in ("pooled", "macro"):
        if row in frame.index:
            out[row] = {k: float(frame.loc[row, k]) for k in COLUMNS if k in frame.columns}
    out["per_type_c2st_knn"] = {
        k: float(v) for k, v in frame["c2st_knn_accuracy"].items() if k not in ("pooled", "macro")
    }
    return out


def table(results: dict) -> str:
    head = ["generator"] + [f"{v} (pooled)" for v in ("C2ST kNN acc", "MMD", "W2")]
    head += [f"{v} (macro)" for v in ("C2ST kNN acc", "MMD", "energy")]
    head += ["precision", "recall", "label fidelity", "C2ST logit AUC"]
    head += ["r mean", "r var", "r zeros", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        p, m = r["metrics"]["pooled"], r["metrics"]["macro"]
        cells = [
            name,
            f"{p['c2st_knn_accuracy']:.3f}",
            f"{p['mmd']:.4f}",
            f"{p['wasserstein']:.2f}",
            f"{m['c2st_knn_accuracy']:.3f}",
            f"{m['mmd']:.4f}",
            f"{m['energy']:.3f}",
            f"{p['precision']:.3f}",
            f"{p['recall']:.3f}",
            f"{p.get('label_fidelity', float('nan')):.3f}",
            f"{p['c2st_logistic_auc']:.3f}",
            f"{p['mean_pearson']:.3f}",
            f"{p['variance_pearson']:.3f}",
            f"{p['zero_fraction_pearson']:.3f}",
            f"{r.get('wall_s', 0):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60, help="SCFM stage-1 epochs")
    parser.add_argument(
        "--epochs-prior",
        type=int,
        default=200,
        help="SCFM stage-2 epochs (chosen on validation cells: benchmarks/prior_design.py)",
    )
    parser.add_argument("--scvi-epochs", type=int, default=100)
    parser.add_argument("--n-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON report (default per seed)")
    args = parser.parse_args(argv)
    args.out = args.out or str(RESULTS / f"generation_seed{args.seed}.json")
    quiet()
    import scfm_adapt as sfa

    RESULTS.mkdir(exist_ok=True)
    rng = np.random.default_rng(args.seed)
    train, test = load(args.seed)
    counts = test.obs[LABEL].astype(str).value_counts().sort_index()
    print(f"train {train.n_obs} cells, test {test.n_obs}; composition {counts.to_dict()}")
    floor_idx = composition_sample(train, counts, rng)
    val_idx = composition_sample(train, counts, rng, exclude=floor_idx)

    def evaluate(gen, reference=test):
        return sfa.metrics.evaluate_generation(reference, gen, groupby=LABEL, seed=args.seed)

    results: dict[str, dict] = {}
    frame = evaluate(train[floor_idx])
    results["real floor (train cells)"] = {"metrics": summarise(frame), "wall_s": 0.0}
    t0 = time.perf_counter()
    nb = nb_per_type(train, counts, rng)
    results["per-type NB"] = {
        "metrics": summarise(evaluate(nb)),
        "wall_s": time.perf_counter() - t0,
    }
    print(table(results), flush=True)

    scvi_model, scvi_wall = train_scvi(train, args.scvi_epochs, args.seed)
    results["scVI prior (type covariate)"] = {
        "metrics": summarise(evaluate(scvi_prior(scvi_model, train, counts, rng))),
        "wall_s": scvi_wall,
    }
    results["scVI posterior predictive (reconstruction)"] = {
        "metrics": summarise(evaluate(scvi_posterior(scvi_model, train, floor_idx))),
        "wall_s": scvi_wall,
    }
    print(table(results), flush=True)

    model, scfm_wall = train_scfm(train, args.epochs, args.epochs_prior, args.seed)
    conditions = pd.DataFrame({LABEL: np.repeat(counts.index, counts.to_numpy())})
    val = train[val_idx]
    tuning = {}
    for g in GUIDANCE_GRID:
        t1 = time.perf_counter()
        gen = model.generate(conditions, guidance_scale=g, n_steps=args.n_steps, seed=1)
        gen_s = time.perf_counter() - t1
        vf = evaluate(gen, reference=val)
        tuning[g] = {
            "val_c2st_knn_pooled": float(vf.loc["pooled", "c2st_knn_accuracy"]),
            "val_c2st_knn_macro": float(vf.loc["macro", "c2st_knn_accuracy"]),
            "generate_s": gen_s,
        }
        print(f"guidance {g}: validation {tuning[g]}", flush=True)
    best = min(GUIDANCE_GRID, key=lambda g: tuning[g]["val_c2st_knn_pooled"])
    for g, label in ((1.0, "SCFM, guidance 1"), (best, f"SCFM, tuned guidance {best}")):
        if label.startswith("SCFM, tuned") and best == 1.0:
            label = "SCFM, tuned guidance (= 1)"
        t1 = time.perf_counter()
        gen = model.generate(conditions, guidance_scale=g, n_steps=args.n_steps, seed=args.seed)
        results[label] = {
            "metrics": summarise(evaluate(gen)),
            "wall_s": scfm_wall,
            "generate_s": time.perf_counter() - t1,
        }
    gen = model.generate(  # sampling seed 0 for every seed, as the scVI prior's
        conditions, guidance_scale=best, sampler="ddpm", n_steps=args.n_steps * 4, seed=0
    )
    results[f"SCFM, guidance {best}, DDPM {args.n_steps * 4} steps"] = {
        "metrics": summarise(evaluate(gen)),
        "wall_s": scfm_wall,
    }
    print(table(results), flush=True)
    report = {
        "benchmark": "generation",
        "dataset": "kang2018_ctrl_8donors",
        "config": vars(args),
        "split": {"n_train": train.n_obs, "n_test": test.n_obs, "composition": counts.to_dict()},
        "guidance_tuning": {str(k): v for k, v in tuning.items()},
        "best_guidance": best,
        "scfm": repr(model),
        "scfm_history_last": {
            st: {k: float(v.iloc[-1, 0]) for k, v in h.items() if len(v)}
            for st, h in model.history.items()
        },
        "environment": environment_info(),
        "results": results,
        "table": table(results),
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()

"""Prior design on validation cells only: how the latent and the prior's training budget
change label-conditional generation.

Kang 2018 control PBMCs, the *training* cells of ``benchmarks/generation.py`` only (its 20%
test cells are never loaded): they are split again, 85% to train and 15% to validate,
stratified by cell type. Per latent setting (``--configs``, as in
``benchmarks/latent_design.py``) the VAE trains once; the DiT prior then trains in chunks
(``--prior-epochs``, cumulative, without early stopping), and after each chunk cells are
generated from the validation cells' labels (guidance 1, DDIM 50 steps) and compared with
them by :func:`scfm_adapt.metrics.evaluate_generation`: pooled and per-type (macro) C2ST,
Wasserstein distance, precision / recall, label fidelity.

``python benchmarks/prior_design.py --configs default kl0.1 --prior-epochs 25 50 100``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _common import quiet
from latent_design import CONFIGS

LABEL = "cluster_id"
RESULTS = Path(__file__).parent / "results"
SHOWN = (
    "c2st_knn_accuracy",
    "wasserstein",
    "precision",
    "recall",
    "label_fidelity",
    "mean_pearson",
    "variance_pearson",
    "zero_fraction_pearson",
)


def load(seed: int):
    from sklearn.model_selection import train_test_split

    from generation import load as generation_split

    train, _ = generation_split(seed)  # the generation benchmark's test cells stay out
    idx = np.arange(train.n_obs)
    tr, va = train_test_split(
        idx, test_size=0.15, stratify=train.obs[LABEL].to_numpy(), random_state=seed
    )
    return train[np.sort(tr)].copy(), train[np.sort(va)].copy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["default", "kl0.1"], choices=list(CONFIGS))
    p.add_argument("--epochs", type=int, default=40, help="VAE epochs")
    p.add_argument("--prior-epochs", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--lr-prior", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "prior_design.json")
    args = p.parse_args()

    import scvi
    import torch

    import scfm_adapt as sfa

    torch.set_num_threads(args.threads)
    quiet()
    train, val = load(args.seed)
    rows = []
    for name in args.configs:
        model_kwargs, plan_kwargs = CONFIGS[name]
        scvi.settings.seed = args.seed
        a = train.copy()
        sfa.model.SCFM.setup_anndata(a, labels_key=LABEL)
        model = sfa.model.SCFM(a, **model_kwargs)
        fit = {"enable_progress_bar": False, "plan_kwargs": plan_kwargs, "batch_size": 128}
        model.train(max_epochs=args.epochs, stage="vae", **fit)
        done, t0 = 0, time.perf_counter()
        for total in args.prior_epochs:
            model.train(
                max_epochs=total - done,
                stage="prior",
                early_stopping=False,
                train_size=1.0,
                lr_prior=args.lr_prior,
                enable_progress_bar=False,
                batch_size=128,
            )
            done = total
            gen = model.generate({LABEL: val.obs[LABEL].astype(str).to_numpy()}, seed=args.seed)
            gen.obs[LABEL] = gen.obs[LABEL].astype(str)
            table = sfa.metrics.evaluate_generation(val, gen, groupby=LABEL, seed=args.seed)
            row = {"config": name, "prior_epochs": total, "lr_prior": args.lr_prior}
            row["prior_s"] = time.perf_counter() - t0
            for where in ("pooled", "macro"):
                for col in SHOWN:
                    if col in table.columns:
                        row[f"{where}_{col}"] = float(table.loc[where, col])
            rows.append(row)
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

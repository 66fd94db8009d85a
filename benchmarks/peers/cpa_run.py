"""Run the peer CPA (``cpa-tools`` 0.8.1, theislab) on the perturbation splits.

Runs in CPA's own environment, never the project's. cpa-tools 0.8.1 needs ``torch<2`` and
``scvi-tools<1``; torch 1.13.1 fails to import ``torch.distributed`` on Python 3.11 (a
dataclass error that pytorch-lightning 1.9 triggers), so the environment is Python 3.10 with
the 2023-era stack that scvi-tools 0.20.3 was released against::

    python3.10 -m venv ../peer-venvs/cpa
    ../peer-venvs/cpa/bin/pip install torch==1.13.1
    ../peer-venvs/cpa/bin/pip install torch==1.13.1 cpa-tools==0.8.1 numpy==1.26.4 \\
        "setuptools<70" jax==0.4.23 jaxlib==0.4.23 ml_dtypes==0.3.2 flax==0.7.5 optax==0.1.7 \\
        chex==0.1.85 numpyro==0.13.2 orbax-checkpoint==0.4.8 anndata==0.9.2 pandas==1.5.3 \\
        mudata==0.2.3 torchmetrics==0.11.4 scipy==1.11.4 scikit-learn==1.3.2 scanpy==1.9.8 \\
        seaborn==0.13.2 matplotlib==3.8.4 h5py==3.10.0 statsmodels==0.14.1

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ../peer-venvs/cpa/bin/python \\
        benchmarks/peers/cpa_run.py ../peer-splits ../peer-preds --seed 0 \\
        --tasks kang norman_combo mcfaline

Reads ``SPLITS/perturbation/<task>/fold<i>/`` (see ``export.py``) and writes, per fold,
``PREDS/cpa/seed<k>/perturbation/<task>/fold<i>.h5ad``: one predicted cell per row of
``controls.h5ad`` (same order, ``obs["unit"]`` copied), ``X`` = log1p of counts per 10,000 on
the training genes; and ``meta.json`` per task (versions, settings, wall seconds per fold,
units skipped and why).

Per fold: one AnnData holds the training cells (raw counts; a random 10% of them, drawn with
the seed, are CPA's ``valid`` split for early stopping) and, as CPA's ``ood`` split, each
held-out unit's control cells labelled with the unit's perturbation and context. CPA encodes a
cell, adds the perturbation's and the covariate's embeddings and decodes; ``predict`` on the
``ood`` rows is therefore its counterfactual for the control cell under the unit's
perturbation (the procedure of the tutorials' evaluation: control cells' ``X``, target
labels). With the negative-binomial loss ``obsm["CPA_pred"]`` is the NB mean in counts on the
control cell's library size; it is turned into log1p(normalize_total 1e4), as the Norman
tutorial does. The ``ood`` rows are never trained on; nothing is tuned on them.

Settings (sources, theislab/cpa ``docs/tutorials``):

- ``kang`` and ``mcfaline`` (transfer of a perturbation to a held-out covariate: cell type,
  cell line): the Kang tutorial (``Kang.ipynb``), model and plan parameters as published,
  ``batch_size=512``, ``check_val_every_n_epoch=5``, ``early_stopping_patience=5``.
- ``norman_combo`` (unseen combination of seen genes): the Norman tutorial
  (``Norman.ipynb``, "Predicting single-cell response to unseen combinatorial CRISPR
  perturbations"), ``batch_size=2048``, same validation cadence and patience.
- Both tutorials use ``max_epochs=2000``; ``--max-epochs`` caps it at 400 by default, the
  cap ``CPA.train`` itself uses when given none (``min(round(20000 / n_cells * 400), 400)``,
  400 for every fold here), which bounds a fold at about 4 minutes on one CPU thread. CPA's
  early stopping on the ``valid`` cells (patience 5 validations) and its best-state restore
  (``SaveBestState`` on ``cpa_metric``) are kept; most folds stop well before the cap.
- ``seed`` in the model parameters (the tutorials' 6977 / 8206) is replaced by ``--seed``.
- ``setup_anndata``: ``is_count_data=True``, ``dosage_key=None`` (CPA sets 1.0 per gene),
  ``categorical_covariate_keys=["context"]`` (a single value ``"none"`` where the task has no
  covariate, as the Norman tutorial's one cell type), ``max_comb_len`` the longest
  combination (1 for Kang and McFaline, 2 for Norman, as in the tutorials); no DEG mask.
- A unit with a gene that no training cell has perturbed (alone or in a combination) is
  skipped and listed in ``meta.json``: CPA has no trained embedding for it. ``norman_unseen``
  is not run at all for that reason; in ``norman_combo`` it applies to the combinations with
  such a gene. A fold file then holds only the predicted units' rows, in ``controls.h5ad``
  order.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import json
import logging
import random
import time
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from _cli import runner_parser

PEER = "cpa"
CONTROL = "control"
NO_CONTEXT = "none"
VALID_FRACTION = 0.1
UNSEEN_REASON = "not applicable: unseen perturbation has no embedding in CPA"

# Kang tutorial (theislab/cpa docs/tutorials/Kang.ipynb)
KANG = {
    "source": "theislab/cpa docs/tutorials/Kang.ipynb",
    "model": {
        "n_latent": 64,
        "recon_loss": "nb",
        "doser_type": "linear",
        "n_hidden_encoder": 128,
        "n_layers_encoder": 2,
        "n_hidden_decoder": 512,
        "n_layers_decoder": 2,
        "use_batch_norm_encoder": True,
        "use_layer_norm_encoder": False,
        "use_batch_norm_decoder": False,
        "use_layer_norm_decoder": True,
        "dropout_rate_encoder": 0.0,
        "dropout_rate_decoder": 0.1,
        "variational": False,
    },
    "plan": {
        "n_epochs_kl_warmup": None,
        "n_epochs_pretrain_ae": 30,
        "n_epochs_adv_warmup": 50,
        "n_epochs_mixup_warmup": 0,
        "mixup_alpha": 0.0,
        "adv_steps": None,
        "n_hidden_adv": 64,
        "n_layers_adv": 3,
        "use_batch_norm_adv": True,
        "use_layer_norm_adv": False,
        "dropout_rate_adv": 0.3,
        "reg_adv": 20.0,
        "pen_adv": 5.0,
        "lr": 0.0003,
        "wd": 4e-07,
        "adv_lr": 0.0003,
        "adv_wd": 4e-07,
        "adv_loss": "cce",
        "doser_lr": 0.0003,
        "doser_wd": 4e-07,
        "do_clip_grad": True,
        "gradient_clip_value": 1.0,
        "step_size_lr": 10,
    },
    "train": {"batch_size": 512, "early_stopping_patience": 5, "check_val_every_n_epoch": 5},
}

# Norman tutorial (theislab/cpa docs/tutorials/Norman.ipynb)
NORMAN = {
    "source": "theislab/cpa docs/tutorials/Norman.ipynb",
    "model": {
        "n_latent": 32,
        "recon_loss": "nb",
        "doser_type": "linear",
        "n_hidden_encoder": 256,
        "n_layers_encoder": 4,
        "n_hidden_decoder": 256,
        "n_layers_decoder": 2,
        "use_batch_norm_encoder": True,
        "use_layer_norm_encoder": False,
        "use_batch_norm_decoder": False,
        "use_layer_norm_decoder": False,
        "dropout_rate_encoder": 0.2,
        "dropout_rate_decoder": 0.0,
        "variational": False,
    },
    "plan": {
        "n_epochs_kl_warmup": None,
        "n_epochs_adv_warmup": 50,
        "n_epochs_mixup_warmup": 10,
        "n_epochs_pretrain_ae": 10,
        "mixup_alpha": 0.1,
        "lr": 0.0001,
        "wd": 3.2170178270865573e-06,
        "adv_steps": 3,
        "reg_adv": 10.0,
        "pen_adv": 20.0,
        "adv_lr": 0.0001,
        "adv_wd": 7.051355554517135e-06,
        "n_layers_adv": 2,
        "n_hidden_adv": 128,
        "use_batch_norm_adv": True,
        "use_layer_norm_adv": False,
        "dropout_rate_adv": 0.3,
        "step_size_lr": 25,
        "do_clip_grad": False,
        "adv_loss": "cce",
        "gradient_clip_value": 5.0,
    },
    "train": {"batch_size": 2048, "early_stopping_patience": 5, "check_val_every_n_epoch": 5},
}

TASK_SETTINGS = {"kang": KANG, "mcfaline": KANG, "norman_combo": NORMAN}
NOT_APPLICABLE = {"norman_unseen": UNSEEN_REASON}
TASKS = [*TASK_SETTINGS, *NOT_APPLICABLE]

log = logging.getLogger("cpa_run")


def set_seeds(seed: int) -> None:
    """Seed Python, numpy, torch and scvi; keep torch on one thread."""
    import scvi

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - CPA draws mixup weights from the global RNG
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    scvi.settings.seed = seed


def versions() -> dict:
    return {p: version(p) for p in ("cpa-tools", "scvi-tools", "torch", "anndata", "numpy")}


def load_fold(folder: Path) -> tuple[ad.AnnData, ad.AnnData, list[dict]]:
    train = ad.read_h5ad(folder / "train.h5ad")
    controls = ad.read_h5ad(folder / "controls.h5ad")
    units = json.loads((folder / "fold.json").read_text())["units"]
    return train, controls, units


def unit_skip_reason(unit: dict, train: ad.AnnData) -> str | None:
    """Why CPA cannot predict a unit from this training set, or ``None`` when it can."""
    seen_genes = {g for p in train.obs["perturbation"].unique() for g in str(p).split("+")}
    missing = [g for g in unit["perturbation"].split("+") if g not in seen_genes]
    if missing:
        return f"{UNSEEN_REASON} ({', '.join(missing)})"
    if unit["context"] and unit["context"] not in set(train.obs["context"]):
        return f"context '{unit['context']}' not in the training cells"
    return None


def build_adata(
    train: ad.AnnData, controls: ad.AnnData, units: list[dict], seed: int
) -> tuple[ad.AnnData, np.ndarray]:
    """Training cells (``train``/``valid``) plus the units' control cells as ``ood``.

    Returns the AnnData and, for each row of ``controls``, its row in it (-1 where the
    unit is skipped).
    """
    by_unit = {u["unit"]: u for u in units}
    keep = np.array([by_unit[u]["keep"] for u in controls.obs["unit"]], dtype=bool)

    tr = ad.AnnData(X=sp.csr_matrix(train.X, dtype=np.float32), var=train.var[[]].copy())
    tr.obs_names = [f"train:{i}" for i in range(train.n_obs)]
    rng = np.random.default_rng(seed)
    split = np.where(rng.random(train.n_obs) < VALID_FRACTION, "valid", "train")
    tr.obs = pd.DataFrame(
        {
            "perturbation": train.obs["perturbation"].astype(str).to_numpy(),
            "context": train.obs["context"].astype(str).to_numpy(),
            "split": split,
        },
        index=tr.obs_names,
    )

    ctrl = controls[keep]
    ood = ad.AnnData(X=sp.csr_matrix(ctrl.X, dtype=np.float32), var=train.var[[]].copy())
    ood.obs_names = [f"ood:{i}" for i in range(ctrl.n_obs)]
    ood.obs = pd.DataFrame(
        {
            "perturbation": [by_unit[u]["perturbation"] for u in ctrl.obs["unit"]],
            "context": [by_unit[u]["context"] for u in ctrl.obs["unit"]],
            "split": "ood",
        },
        index=ood.obs_names,
    )
    adata = ad.concat([tr, ood], merge="first")
    adata.obs["context"] = adata.obs["context"].replace("", NO_CONTEXT)
    rows = np.full(controls.n_obs, -1)
    rows[keep] = tr.n_obs + np.arange(ctrl.n_obs)
    return adata, rows


def setup_model(adata: ad.AnnData, settings: dict, seed: int):
    """``setup_anndata`` and the model, as in the tutorials."""
    import cpa

    # CPA keeps the encoders of the first ``setup_anndata`` call on the class: reset them so
    # each fold gets its own perturbations and covariates. An empty SMILES map (not None)
    # skips 0.8.1's SMILES lookup, which raises ``KeyError: None`` without a ``smiles_key``;
    # SMILES are used only with ``use_rdkit_embeddings``, off here as in the tutorials.
    cpa.CPA.pert_encoder = None
    cpa.CPA.covars_encoder = None
    cpa.CPA.pert_smiles_map = {}
    max_comb_len = int(adata.obs["perturbation"].str.count(r"\+").max()) + 1
    cpa.CPA.setup_anndata(
        adata,
        perturbation_key="perturbation",
        control_group=CONTROL,
        dosage_key=None,
        categorical_covariate_keys=["context"],
        is_count_data=True,
        max_comb_len=max_comb_len,
    )
    model = cpa.CPA(
        adata,
        split_key="split",
        train_split="train",
        valid_split="valid",
        test_split="ood",
        **settings["model"],
        seed=seed,
    )
    return model, max_comb_len


def train_model(model, settings: dict, max_epochs: int) -> dict:
    """Train with the tutorial's plan; returns how training went."""
    model.train(
        max_epochs=max_epochs,
        use_gpu=False,
        plan_kwargs=dict(settings["plan"]),
        save_path=False,
        enable_progress_bar=False,
        **settings["train"],
    )
    callbacks = {type(c).__name__: c for c in model.trainer.callbacks}
    best, stop = callbacks.get("SaveBestState"), callbacks.get("EarlyStopping")
    return {
        "epochs": int(model.trainer.current_epoch),
        "early_stopped": bool(stop is not None and stop.stopped_epoch > 0),
        "best_cpa_metric": (
            float(best.best_module_metric_val)
            if best is not None and np.isfinite(best.best_module_metric_val)
            else None  # no validation ran
        ),
    }


def predict_log_cp10k(model, adata: ad.AnnData, rows: np.ndarray) -> np.ndarray:
    """CPA's NB mean for the given rows, as log1p of counts per 10,000."""
    model.predict(adata, batch_size=2048)
    mu = np.asarray(adata.obsm["CPA_pred"], dtype=np.float64)[rows]
    total = mu.sum(axis=1, keepdims=True)
    return np.log1p(mu / np.maximum(total, 1e-12) * 1e4).astype(np.float32)


def write_fold(path: Path, pred: np.ndarray, controls: ad.AnnData, genes: pd.Index) -> None:
    out = ad.AnnData(
        X=pred,
        obs=pd.DataFrame(
            {"unit": controls.obs["unit"].astype(str).to_numpy()}, index=controls.obs_names.copy()
        ),
        var=pd.DataFrame(index=genes.copy()),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(path)


def run_fold(folder: Path, out: Path, settings: dict, seed: int, max_epochs: int) -> dict:
    """Train CPA on one fold and write its predictions; returns the fold's record."""
    train, controls, units = load_fold(folder)
    skipped = {}
    for u in units:
        reason = unit_skip_reason(u, train)
        u["keep"] = reason is None
        if reason:
            skipped[u["unit"]] = reason
    record = {"fold": folder.name, "skipped": skipped}
    if not any(u["keep"] for u in units):
        log.info("%s: every unit skipped", folder)
        return record

    set_seeds(seed)
    start = time.perf_counter()
    adata, rows = build_adata(train, controls, units, seed)
    model, max_comb_len = setup_model(adata, settings, seed)
    record.update(train_model(model, settings, max_epochs))
    kept = rows >= 0
    pred = predict_log_cp10k(model, adata, rows[kept])
    record["wall_s"] = round(time.perf_counter() - start, 1)
    write_fold(out / f"{folder.name}.h5ad", pred, controls[kept], train.var_names)
    record.update(
        units=[u["unit"] for u in units if u["keep"]],
        n_train=int((adata.obs["split"] == "train").sum()),
        n_valid=int((adata.obs["split"] == "valid").sum()),
        n_predicted=int(kept.sum()),
        max_comb_len=max_comb_len,
    )
    log.info("%s: %s", folder, record)
    return record


def run_task(splits: Path, preds: Path, task: str, seed: int, max_epochs: int, only=None) -> None:
    out = preds / PEER / f"seed{seed}" / "perturbation" / task
    out.mkdir(parents=True, exist_ok=True)
    folds = sorted((splits / "perturbation" / task).glob("fold*"), key=lambda p: int(p.name[4:]))
    if only is not None:
        folds = [f for f in folds if int(f.name[4:]) in only]
    meta = {"peer": PEER, "task": task, "seed": seed, "versions": versions()}
    if task in NOT_APPLICABLE:
        meta["not_applicable"] = NOT_APPLICABLE[task]
        meta["folds"] = [
            {"fold": f.name, "skipped": {u["unit"]: NOT_APPLICABLE[task] for u in load_fold(f)[2]}}
            for f in folds
        ]
    else:
        settings = TASK_SETTINGS[task]
        meta["settings"] = {
            "source": settings["source"],
            "model": settings["model"],
            "plan": settings["plan"],
            "train": {**settings["train"], "max_epochs": max_epochs, "use_gpu": False},
            "valid_fraction": VALID_FRACTION,
            "setup_anndata": {
                "dosage_key": None,
                "categorical_covariate_keys": ["context"],
                "is_count_data": True,
            },
            "prediction": "obsm['CPA_pred'] (NB mean counts) -> log1p(normalize_total 1e4)",
            "torch_threads": torch.get_num_threads(),
        }
        meta["folds"] = [run_fold(f, out, settings, seed, max_epochs) for f in folds]
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def main(argv=None) -> None:
    parser = runner_parser(__doc__)
    parser.add_argument("--tasks", nargs="*", default=list(TASK_SETTINGS), choices=TASKS)
    parser.add_argument("--max-epochs", type=int, default=400)
    parser.add_argument("--folds", type=int, nargs="*", help="only these fold numbers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    for task in args.tasks:
        run_task(args.splits, args.preds, task, args.seed, args.max_epochs, args.folds)


if __name__ == "__main__":
    main()

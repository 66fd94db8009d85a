"""Perturbation-response benchmark: PerturbationModel beside every baseline, same splits.

Tasks (seed 0), all on the real data in ``$SCFM_ADAPT_DATA`` / ``../shared/data``:

- ``kang``: Kang 2018 IFN-β; leave out the stimulated cells of one cell type and predict
  them from its control cells; once per cell type (5 units).
- ``norman_combo``: Norman 2019 (``dataset == "norman19"``); hold out 30% of the two-gene
  combinations (ceil, 5 of 15).
- ``norman_unseen``: the same cells; hold out 5 single genes (with GO features) and every
  training perturbation that contains them; predict their singles.
- ``mcfaline``: McFaline-Figueroa 2023; hold out one cell line's perturbed cells (default
  A172) and predict each of its perturbations from its control cells.

Metrics (``sfa.metrics``, on log1p(normalize_total 1e4)): ``pearson_delta`` (all genes),
``pearson_delta_top20``, ``r2_top100``, ``sign_acc_top20``, ``cosine_lfc``, ``energy``
(PCA fitted on the training cells, outside every scored unit) and ``rank`` (among the
task's units). Every method's cells are sampled counts, except the shift baselines (control
cells + delta, log-normalised), ``scvi_arith_mean`` (decoded means, for reference) and
PerturbationModel with ``counts="control_plus_change"`` (its ``layers["scfm_lognorm"]``:
control cells + predicted change, log-normalised, as the shift baselines; its sampled
counts are scored in the ``*_counts`` row). ``pairwise r``: the mean correlation between
the predicted deltas of different units, beside that of the observed deltas (a model that
gives every unit the same response has 1).
``ceiling``: half of the real perturbed cells against the other half.

Usage::

    python benchmarks/perturbation.py [--tasks kang norman_combo ...] [--epochs 60]
        [--variants default expr_anchor ...] [--save-predictions preds]

``--save-predictions`` writes every method's cells as h5ad, which
``benchmarks/cell_eval_runner.py`` scores with cell-eval in its own environment.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import quiet

RESULTS = Path(__file__).parent / "results"


def kang_units():
    import scfm_adapt as sfa

    a = sfa.datasets.kang2018_ifnb()
    for ct in sorted(a.obs["cluster_id"].astype(str).unique()):
        is_ct = a.obs["cluster_id"].astype(str).to_numpy() == ct
        stim = a.obs["group_id"].astype(str).to_numpy() == "stim"
        yield {
            "name": f"kang[{ct}]",
            "train": a[~(is_ct & stim)].copy(),
            "setup": {
                "perturbation_key": "group_id",
                "control_group": "ctrl",
                "covariate_keys": ["cluster_id"],
            },
            "test": {("stim", ct): (a[is_ct & ~stim].copy(), a[is_ct & stim].copy())},
            "features": None,
        }


def _norman():
    import scfm_adapt as sfa

    a = sfa.datasets.norman2019(dataset="norman19")
    a.obs["condition"] = a.obs["condition"].astype(str)
    return a


def _norman_task(a, held: list[str], name: str):
    cond = a.obs["condition"].to_numpy()
    test_mask = np.isin(cond, held)
    ctrl = a[cond == "control"].copy()
    return {
        "name": name,
        "train": a[~test_mask].copy(),
        "setup": {"perturbation_key": "condition", "control_group": "control"},
        "test": {(p, ""): (ctrl, a[cond == p].copy()) for p in held},
        "features": "go",
    }


def norman_combo_units():
    a = _norman()
    combos = sorted({c for c in a.obs["condition"] if "+" in c})
    rng = np.random.default_rng(0)
    held = sorted(rng.permutation(combos)[: math.ceil(0.3 * len(combos))].tolist())
    yield _norman_task(a, held, "norman_combo")


def norman_unseen_units():
    import scfm_adapt as sfa

    a = _norman()
    singles = sorted({c for c in a.obs["condition"] if "+" not in c and c != "control"})
    feats = sfa.datasets.go_gene_features(singles)
    candidates = [g for g in singles if g in feats.index]
    rng = np.random.default_rng(0)
    genes = sorted(rng.permutation(candidates)[:5].tolist())
    drop = [c for c in a.obs["condition"].unique() if set(c.split("+")) & set(genes)]
    keep = ~np.isin(a.obs["condition"].to_numpy(), drop)
    task = _norman_task(a, genes, "norman_unseen")
    task["train"] = a[keep].copy()
    task["dropped_combos"] = sorted(set(drop) - set(genes))
    yield task


def mcfaline_units(line: str = "A172"):
    import scfm_adapt as sfa

    a = sfa.datasets.norman2019(dataset="mcfaline23")
    a.obs["condition"] = a.obs["condition"].astype(str)
    is_line = a.obs["cell_type"].astype(str).to_numpy() == line
    cond = a.obs["condition"].to_numpy()
    test_mask = is_line & (cond != "control")
    ctrl = a[is_line & (cond == "control")].copy()
    perts = sorted(set(cond[test_mask]))
    yield {
        "name": f"mcfaline[{line}]",
        "train": a[~test_mask].copy(),
        "setup": {
            "perturbation_key": "condition",
            "control_group": "control",
            "covariate_keys": ["cell_type"],
        },
        "test": {(p, line): (ctrl, a[test_mask & (cond == p)].copy()) for p in perts},
        "features": "go",
    }


TASKS = {
    "kang": kang_units,
    "norman_combo": norman_combo_units,
    "norman_unseen": norman_unseen_units,
    "mcfaline": mcfaline_units,
}


def unit_name(p: str, ctx: str) -> str:
    return f"{p}@{ctx}" if ctx else p


def ceiling_halves(true_ln: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The real perturbed cells split in two disjoint halves (the noise ceiling scores the
    first as a prediction of the second)."""
    order = np.random.default_rng(seed).permutation(true_ln.shape[0])
    half = len(order) // 2
    return true_ln[order[:half]], true_ln[order[half:]]


def training_reference(task: dict, seed: int = 0) -> np.ndarray:
    """2,000 log-normalised training cells: the PCA reference of the energy distance."""
    import scfm_adapt as sfa

    idx = np.random.default_rng(seed).permutation(task["train"].n_obs)[:2000]
    return sfa.metrics.lognorm(task["train"][idx])


def ceiling_scores(task: dict, seed: int = 0, reference=None) -> tuple[pd.DataFrame, dict, dict]:
    """Noise-ceiling scores of a task, with the mean deltas of both halves per unit."""
    import scfm_adapt as sfa

    L = sfa.metrics.lognorm
    pred, truth, ctrls = {}, {}, {}
    for (p, ctx), (ctrl, true) in task["test"].items():
        u = unit_name(p, ctx)
        pred[u], truth[u] = ceiling_halves(L(true), seed)
        ctrls[u] = L(ctrl)
    if reference is None:
        reference = training_reference(task, seed)
    scores = sfa.metrics.evaluate_predictions({"ceiling": pred}, truth, ctrls, reference)
    pred_d = {u: pred[u].mean(0) - ctrls[u].mean(0) for u in pred}
    true_d = {u: truth[u].mean(0) - ctrls[u].mean(0) for u in truth}
    return scores, pred_d, true_d


#: PerturbationModel variants: name -> keyword arguments
VARIANTS = {
    "default": {},  # anchor="expression"
    "heads": {"anchor": None},  # the heads alone, the default before the anchors
    "anchor": {"anchor": "latent"},
    "cpc": {"counts": "control_plus_change"},
    "anchor_cpc": {"anchor": "latent", "counts": "control_plus_change"},
    "expr_anchor": {"anchor": "expression"},
    "expr_anchor_flow": {"anchor": "expression", "response": "flow"},
    # the same flow (a DiT of width 64, depth 2) started from the backbone's prior, a DiT
    # of that size trained on the task's training cells (stage 2): only the start differs
    "expr_anchor_flow_prior": {
        "anchor": "expression",
        "response": "flow",
        "flow_init": "prior",
        "dit_hidden": 64,
        "dit_depth": 2,
    },
}
BASELINES = ("no_change", "mean_shift", "additive", "linear", "scvi_arith", "scvi_arith_mean")


def baseline_predictions(task: dict, scvi_epochs: int | None, seed: int = 0) -> tuple:
    """Every baseline's predictions for the task's units (log-normalised cells).

    Returns ``(preds, truth, ctrls, scvi_seconds)``: ``preds[method][unit]``, and the real
    perturbed and control cells of each unit. ``scvi_epochs=None`` leaves out the two scVI
    rows (the other baselines take seconds; scVI takes minutes).
    """
    import scfm_adapt as sfa

    B = sfa.baselines
    L = sfa.metrics.lognorm
    setup = task["setup"]
    keys = setup.get("covariate_keys", [])
    train = task["train"]
    table = B.PerturbationTable(train, setup["perturbation_key"], setup["control_group"], keys)
    feats = sfa.datasets.go_gene_features() if task["features"] == "go" else None
    linear = B.LinearPCARidge(n_components=10, ridge=0.1, pert_features=feats).fit(table)
    t = time.perf_counter()
    with_scvi = scvi_epochs is not None
    if with_scvi:
        scvi_b = B.ScVILatentArithmetic(
            setup["perturbation_key"],
            setup["control_group"],
            keys,
            max_epochs=scvi_epochs,
            seed=seed,
        ).fit(train)
    scvi_s = time.perf_counter() - t
    methods = BASELINES if with_scvi else [m for m in BASELINES if not m.startswith("scvi")]
    preds: dict[str, dict] = {m: {} for m in methods}
    truth, ctrls = {}, {}
    for (p, ctx), (ctrl, true) in task["test"].items():
        unit = unit_name(p, ctx)
        lc, lt = L(ctrl), L(true)
        truth[unit], ctrls[unit] = lt, lc
        preds["no_change"][unit] = lc
        preds["mean_shift"][unit] = B.shifted_cells(lc, B.mean_shift_delta(table, p, ctx))
        preds["additive"][unit] = B.shifted_cells(lc, B.additive_delta(table, p, ctx))
        preds["linear"][unit] = B.shifted_cells(lc, linear.predict_delta(p, lc.mean(0)))
        if not with_scvi:
            continue
        rule = "additive" if "+" in p else "mean"
        preds["scvi_arith"][unit] = scvi_b.predict(
            ctrl, p, ctx, rule=rule, output="sample", seed=seed
        )
        preds["scvi_arith_mean"][unit] = scvi_b.predict(ctrl, p, ctx, rule=rule, output="mean")
    return preds, truth, ctrls, scvi_s


def save_predictions(folder: Path, task: dict, preds: dict, truth: dict, ctrls: dict) -> None:
    """Write the task's cells as cell-eval reads them: ``real.h5ad`` and ``<method>.h5ad``.

    Each file holds the task's control cells (``obs["condition"] == "control"``) and, per
    held-out unit, the real or predicted cells (``obs["condition"]`` the unit's name), all
    log-normalised (log1p CP10k) on the task's genes. ``benchmarks/cell_eval_runner.py``
    scores them in cell-eval's own environment.
    """
    import anndata as ad

    import scfm_adapt as sfa

    folder.mkdir(parents=True, exist_ok=True)
    genes = task["train"].var_names
    ctrl = next(iter(ctrls.values()))
    if not all(np.array_equal(c, ctrl) for c in ctrls.values()):
        raise ValueError("cell-eval needs one control group per file; the units' differ")

    def dense(x) -> np.ndarray:
        return np.asarray(x.toarray() if hasattr(x, "toarray") else x)

    def write(name: str, cells: dict) -> None:
        blocks = [dense(ctrl), *(dense(cells[u]) for u in truth)]
        labels = ["control"] * len(ctrl) + [u for u in truth for _ in range(len(cells[u]))]
        obs = pd.DataFrame({"condition": labels})
        obs.index = obs.index.astype(str)
        x = np.concatenate(blocks).astype(np.float32)
        ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(folder / f"{name}.h5ad")

    write("real", truth)
    for method, cells in preds.items():
        write(method, cells)
    # cell-eval's cell-mean baseline: every unit predicted as the mean training perturbed cell
    setup, train = task["setup"], task["train"]
    is_pert = train.obs[setup["perturbation_key"]].astype(str) != setup["control_group"]
    x = train[is_pert.to_numpy()].X
    mean = (
        sum(  # in blocks: the dense log-normalised matrix of all of them can be GBs
            sfa.metrics.lognorm(x[i : i + 4096]).sum(0) for i in range(0, x.shape[0], 4096)
        )
        / x.shape[0]
    )
    write("cell_mean", {u: np.tile(mean, (len(truth[u]), 1)) for u in truth})


def run_task(
    task: dict,
    epochs: int,
    head_steps: int,
    scvi_epochs: int,
    seed: int = 0,
    variants: tuple[str, ...] = ("default",),
    save_to: Path | None = None,
    prior_steps: int = 3000,
) -> tuple[dict, dict]:
    """Predictions of every method for the task's units (log-normalised cells), plus extras."""
    import torch

    import scfm_adapt as sfa

    L = sfa.metrics.lognorm
    setup = task["setup"]
    keys = setup.get("covariate_keys", [])
    train = task["train"]
    extras = {"coverage": {}, "width": {}, "ood": {}, "seconds": {}}
    preds, truth, ctrls, extras["seconds"]["scvi"] = baseline_predictions(task, scvi_epochs, seed)

    for variant in variants:
        # PerturbationModel with the variant's arguments (VARIANTS); an anchored one is scored
        # twice: as trained, and with every member's correction weight set to 0 (the latent
        # anchor alone, the ablation; "<name>_only")
        kwargs = VARIANTS[variant]
        anchored = bool(kwargs.get("anchor"))
        name = "scfm" if variant == "default" else f"scfm_{variant}"
        torch.manual_seed(seed)
        t = time.perf_counter()
        sfa.model.PerturbationModel.setup_anndata(train, **setup)
        model = sfa.model.PerturbationModel(train, gene_features=task["features"], **kwargs)
        # a flow trains with its own default steps (its steps cost more than a head's)
        steps = None if kwargs.get("response") == "flow" else head_steps
        backbone = {}
        if kwargs.get("flow_init") == "prior":  # the backbone's prior: prior_steps steps
            per_epoch = math.ceil(0.9 * train.n_obs / 128)
            backbone = {"stage": "both", "max_epochs_prior": math.ceil(prior_steps / per_epoch)}
        model.train(max_epochs=epochs, head_steps=steps, progress=False, seed=seed, **backbone)
        extras["seconds"][f"{name}_train"] = time.perf_counter() - t
        extras[f"{name}_calibration_oob_pearson"] = model.calibration_["oob_pearson"]
        if anchored:
            extras.setdefault("correction_weights", {})[name] = list(model.correction_weights_)
            if kwargs.get("response") == "flow":  # its guidance scale, chosen out of bag
                extras.setdefault("guidance", {})[name] = model.guidance_
        if kwargs.get("anchor") == "expression":  # the arithmetic rule's space, and why
            val = model.arithmetic_validation_
            means = {
                k: round(float(np.mean(val[k])), 3)
                for k in ("expression", "log_ratio", "counts")
                if val.get("units")
            }
            extras.setdefault("arithmetic", {})[name] = (
                model.arithmetic_space_,
                model.decoded_change_,
                len(val.get("units", [])),
                means,
            )
        extras.setdefault("feature_map", {})[name] = {
            space: bool(a.feature_map.abs().sum() > 0) for space, a in model.full_anchors_.items()
        }
        # the log-normalised cells (layers["scfm_lognorm"]: each control cell plus its
        # predicted change, as the shift baselines' cells; with counts="decoded" the sampled
        # counts); an anchored model also scored on its sampled counts ("<name>_counts")
        outs = [name, f"{name}_counts", f"{name}_only"] if anchored else [name]
        for out_name in outs:
            if out_name.endswith("_only"):
                model.correction_weights_ = [0.0] * len(model.heads)
            preds[out_name] = {}
            for (p, ctx), (ctrl, _) in task["test"].items():
                unit = unit_name(p, ctx)
                lc, lt = ctrls[unit], truth[unit]
                cov = {keys[0]: ctx} if keys else None
                out = model.predict_perturbation(ctrl, p, covariates=cov, seed=seed)
                counts_row = out_name.endswith("_counts")
                preds[out_name][unit] = L(out) if counts_row else out.layers["scfm_lognorm"]
                if out_name == name:
                    dt = lt.mean(0) - lc.mean(0)
                    lo = out.varm["scfm_delta_lower"].iloc[:, 0].to_numpy()
                    hi = out.varm["scfm_delta_upper"].iloc[:, 0].to_numpy()
                    extras["coverage"].setdefault(name, []).append(
                        float(np.mean((dt >= lo) & (dt <= hi)))
                    )
                    extras["width"].setdefault(name, []).append(float(np.mean(hi - lo)))
                    extras["ood"].setdefault(name, {})[unit] = float(out.obs["ood_score"].iloc[0])
    if save_to is not None:
        save_predictions(save_to / task["name"], task, preds, truth, ctrls)
    reference = training_reference(task, seed)
    scores = sfa.metrics.evaluate_predictions(preds, truth, ctrls, reference)
    ceil_scores, ceil_pred_d, ceil_true_d = ceiling_scores(task, seed, reference)
    extras["deltas"] = {
        m: {u: v.mean(0) - ctrls[u].mean(0) for u, v in d.items()} for m, d in preds.items()
    }
    extras["deltas"]["ceiling"] = ceil_pred_d
    extras["true_deltas"] = {u: truth[u].mean(0) - ctrls[u].mean(0) for u in truth}
    extras["ceiling_true_deltas"] = ceil_true_d
    return pd.concat([scores, ceil_scores], ignore_index=True), extras


def main(argv=None) -> None:
    quiet()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--epochs", type=int, default=60, help="backbone (SCFM VAE) epochs")
    parser.add_argument("--head-steps", type=int, default=1000)
    parser.add_argument("--scvi-epochs", type=int, default=100)
    parser.add_argument(
        "--prior-steps",
        type=int,
        default=3000,
        help="optimiser steps of the backbone's prior for the *_flow_prior variant",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        choices=list(VARIANTS),
        help="PerturbationModel variants (see VARIANTS)",
    )
    parser.add_argument(
        "--save-predictions",
        type=Path,
        default=None,
        help="folder for every method's cells as h5ad, for benchmarks/cell_eval_runner.py",
    )
    args = parser.parse_args(argv)
    import torch

    import scfm_adapt as sfa

    torch.set_num_threads(max(1, int(__import__("os").environ.get("OMP_NUM_THREADS", "2"))))
    RESULTS.mkdir(exist_ok=True)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    for name in args.tasks:
        all_scores, cover, width, ood, secs, weights = [], {}, {}, {}, [], []
        deltas, true_d, ceil_d = {}, {}, {}
        t0 = time.perf_counter()
        save_to = args.save_predictions and args.save_predictions / f"seed{args.seed}"
        for task in TASKS[name]():
            scores, extras = run_task(
                task,
                args.epochs,
                args.head_steps,
                args.scvi_epochs,
                args.seed,
                args.variants,
                save_to,
                args.prior_steps,
            )
            scores["task"] = task["name"]
            all_scores.append(scores)
            for m in extras["coverage"]:
                cover.setdefault(m, []).extend(extras["coverage"][m])
                width.setdefault(m, []).extend(extras["width"][m])
                ood.setdefault(m, {}).update(extras["ood"][m])
            weights.append(extras.get("correction_weights"))
            fmap = extras.get("feature_map")
            secs.append(extras["seconds"])
            for m, d in extras["deltas"].items():
                deltas.setdefault(m, {}).update(d)
            true_d.update(extras["true_deltas"])
            ceil_d.update(extras["ceiling_true_deltas"])
            times = ", ".join(f"{k} {v:.0f} s" for k, v in extras["seconds"].items())
            oob = {
                k.split("_calibration")[0]: round(v, 3)
                for k, v in extras.items()
                if k.endswith("calibration_oob_pearson")
            }
            print(
                f"  {task['name']}: done in {sum(extras['seconds'].values()):.0f} s ({times}); "
                f"OOB Pearson of the calibration {oob}; anchored members' correction "
                f"weights {extras.get('correction_weights')}; flow guidance "
                f"{extras.get('guidance')}; GO feature map kept {fmap}; "
                "arithmetic rule (space, decoded change, left-out training units, their "
                f"mean top-20 r per candidate) {extras.get('arithmetic')}",
                flush=True,
            )
        scores = pd.concat(all_scores, ignore_index=True)
        units = list(true_d)
        if len(units) >= 2:  # rank among all held-out units of the task (across folds)
            for m, d in deltas.items():
                ref = ceil_d if m == "ceiling" else true_d
                r = sfa.metrics.rank_metric(
                    np.stack([d[u] for u in units]), np.stack([ref[u] for u in units])
                )
                for u, v in zip(units, r):
                    scores.loc[(scores["method"] == m) & (scores["unit"] == u), "rank"] = v
        scores.to_csv(RESULTS / f"perturbation_{name}_seed{args.seed}.csv", index=False)
        table = sfa.metrics.summarize(scores.drop(columns=["task"]))
        print(
            f"\n== {name}: {scores['unit'].nunique()} held-out units, seed {args.seed}, "
            f"{time.perf_counter() - t0:.0f} s"
        )
        print(table.round(3).to_string())
        if len(units) >= 3:  # collapse: how alike the predicted deltas of different units are

            def pairwise(d, units=units):
                r = np.corrcoef(np.stack([d[u] for u in units]))
                return float(r[np.triu_indices(len(units), 1)].mean())

            pw = {m: round(pairwise(d), 3) for m, d in deltas.items()}
            print(f"pairwise r of the deltas: observed {pairwise(true_d):.3f}; {pw}")
        for m in cover:
            print(
                f"{m} 90% intervals of the mean delta: coverage {np.mean(cover[m]):.3f} "
                f"(per unit {np.round(cover[m], 3).tolist()}), mean width {np.mean(width[m]):.3f}"
            )
            print(f"{m} OOD score per unit:", {k: round(v, 2) for k, v in ood[m].items()})
        ours = [m for m in table.index if m.startswith("scfm")]
        best = table.drop(index=[*ours, "ceiling", "scvi_arith_mean"], errors="ignore")[
            "pearson_delta_top20"
        ]
        mine = ", ".join(f"{m} {table.loc[m, 'pearson_delta_top20']:.3f}" for m in ours)
        print(
            f"top-20 pearson_delta: {mine} vs best baseline {best.idxmax()} {best.max():.3f}\n",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Tokenizer benchmark: every SCFM tokenizer against the latent default, baselines beside them.

The SCFM encoder reads a cell through one of four tokenizers (``SCFM(tokenizer=...)``):
``latent`` (the default, one linear map of all genes to 8 tokens), ``pathway`` (one token per
GO biological-process gene set, default options ``max_sets=64, min_size=10, max_size=300``),
``pathway`` with ``gene_graph="go"`` (graph-masked attention between pathway tokens; row
``pathway+go_graph``), ``rank`` (the cell's top 64 genes as gene-id tokens, Geneformer's
input), ``geneformer`` (an external BERT) and ``scgpt`` (scGPT's transformer). No real
Geneformer or scGPT weights can be downloaded here: the ``geneformer`` rows use a *randomly
initialised, frozen* BERT written by :func:`scfm_adapt.data.write_random_geneformer` (hidden
64, 2 layers, 4 heads, intermediate 128, at most 256 genes per cell), the ``scgpt`` rows a
random scGPT written by :func:`scfm_adapt.data.write_random_scgpt` of the same sizes (at most
256 genes plus ``<cls>``), each with the data set's own genes as vocabulary. Their quality
numbers say nothing about Geneformer or scGPT; they are there for speed and parameter counts
only.

Two sections, each on the splits of the existing benchmarks and with their code:

``annotation``
    ``benchmarks/_annotation.py``'s splits (default ``pbmc68k``: stratified 70/30, seed 0),
    metrics (accuracy, macro-F1, ECE, NLL on the test cells) and the two cheap baselines
    (``logreg_hvg``, ``knn_pca``; scVI/scANVI take ~10 min each on pbmc68k and are in
    ``annotation.py``'s table). For every tokenizer an SCFM is pretrained (stage 1,
    self-supervised, train cells only, a fixed number of epochs *without* early stopping, so
    every tokenizer gets the same epochs), then a :class:`~scfm_adapt.model.CellAnnotator`
    is fitted per strategy with ``annotation.py``'s settings (``ANNOTATOR``: learning rates,
    LoRA rank 8 on the encoder's default targets, and for pathway tokens the gene → pathway
    weights, which ``CellAnnotator`` trains with LoRA; at most ``--annot-epochs`` epochs, early
    stopping on 10% validation cells). For pathway tokenizers, integrated-gradient pathway
    attributions of the LoRA annotator (``CellAnnotator.get_pathway_attributions``, the
    logit of the true type, ``n_steps=32``) on up to 25 test cells of each of two cell types.
``perturbation``
    ``benchmarks/perturbation.py``'s ``kang`` task (Kang 2018 IFN-beta: the stimulated cells
    of one cell type are held out and predicted from its control cells; no gene features),
    restricted by ``--kang-units`` (default: B cells and CD14+ Monocytes, 2 of the 5 units,
    to fit the time budget). The baselines (no change, mean shift, additive, linear PCA
    ridge, scVI latent arithmetic, sampled and decoded means) and the noise ceiling are
    computed once per unit exactly as in ``perturbation.run_task``; then one
    :class:`~scfm_adapt.model.PerturbationModel` per tokenizer (``tokenizer=`` passed to its
    SCFM backbone), trained with the same backbone epochs and head steps.

Per tokenizer the script reports quality, wall time of pretraining / training (backbone and
response heads separately), embedding throughput (cells/s of
``SCFM.get_latent_representation`` on 2,000 cells, the data set tiled; median of 3 timed
calls after one warm-up), parameters of the SCFM module (``dit_ema``, the EMA copy of the
DiT, excluded; the DiT prior is counted although stage 1 does not train it) and of its
encoder, and the annotator's ``parameter_report()`` per strategy.

Usage::

    python benchmarks/tokenizer_bench.py                       # the default run (~25 min, 2 cores)
    python benchmarks/tokenizer_bench.py --pretrain-epochs 2 --annot-epochs 2 --pert-epochs 2 \\
        --head-steps 20 --scvi-epochs 2 --kang-units "B cells" --out tokenizers_smoke

Writes ``benchmarks/results/<out>.md`` (the printed tables) and ``<out>.json`` (raw numbers,
per-unit scores, errors with tracebacks). A tokenizer that raises is recorded and skipped;
the others go on.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

from _annotation import (
    DATASETS,
    evaluate,
    format_table,
    knn_pca,
    load_split,
    logreg_hvg,
)
from _common import environment_info, fmt, markdown_table, quiet, write_json
from annotation import ANNOTATOR, scfm_annotator
from perturbation import (
    baseline_predictions,
    ceiling_scores,
    kang_units,
    training_reference,
    unit_name,
)

RESULTS = Path(__file__).parent / "results"
TOKENIZERS = ("latent", "pathway", "pathway+go_graph", "rank", "geneformer", "scgpt")
#: Tokenizers read through an external backbone written with random weights.
BACKBONES = ("geneformer", "scgpt")
STRATEGIES = ("linear_probe", "lora")
#: Random-BERT sizes of the ``geneformer`` rows (write_random_geneformer).
GENEFORMER_SIZES = {"hidden": 64, "n_layers": 2, "n_heads": 4, "intermediate": 128, "max_len": 256}
#: The same sizes for the ``scgpt`` rows (write_random_scgpt; 256 genes + <cls>).
SCGPT_SIZES = {"embsize": 64, "nlayers": 2, "nheads": 4, "d_hid": 128, "max_seq_len": 257}
PATHWAY_KWARGS = {"max_sets": 64, "min_size": 10, "max_size": 300}
RANK_TOP_K = 64
#: Cell types whose pathway attributions are listed (pbmc68k ``bulk_labels``).
ATTRIBUTION_TYPES = ("CD14+ Monocyte", "CD19+ B")
ATTRIBUTION_CELLS = 25  # per type
THROUGHPUT_CELLS = 2000


# =========================================================================== helpers
def scfm_kwargs(
    tokenizer: str, backbones: dict[str, Path], n_residual: int | None = None
) -> dict[str, Any]:
    """SCFM arguments of one tokenizer row."""
    if tokenizer == "latent":
        return {}
    # n_residual None: the tokenizer's own default
    pathway_kwargs = PATHWAY_KWARGS | ({} if n_residual is None else {"n_residual": n_residual})
    if tokenizer == "pathway":
        return {"tokenizer": "pathway", "gene_sets": "go", "tokenizer_kwargs": pathway_kwargs}
    if tokenizer == "pathway+go_graph":
        return {
            "tokenizer": "pathway",
            "gene_sets": "go",
            "gene_graph": "go",
            "tokenizer_kwargs": pathway_kwargs,
        }
    if tokenizer == "rank":
        return {"tokenizer": "rank", "tokenizer_kwargs": {"top_k": RANK_TOP_K}}
    if tokenizer in BACKBONES:
        return {"tokenizer": tokenizer, "backbone": str(backbones[tokenizer])}
    raise ValueError(tokenizer)


def write_backbones(workdir: Path, name: str, genes, tokenizers) -> dict[str, Path]:
    """Random checkpoints of the backbone rows among ``tokenizers``, knowing ``genes``."""
    import scfm_adapt as sfa

    genes = [str(g) for g in genes]
    out = {}
    if "geneformer" in tokenizers:
        folder = workdir / f"geneformer_{name}"
        out["geneformer"] = sfa.data.write_random_geneformer(folder, genes, **GENEFORMER_SIZES)
    if "scgpt" in tokenizers:
        folder = workdir / f"scgpt_{name}"
        out["scgpt"] = sfa.data.write_random_scgpt(folder, genes, **SCGPT_SIZES)
    return out


def reset_seeds(seed: int = 0) -> None:
    import scvi
    import torch

    scvi.settings.seed = seed
    torch.manual_seed(seed)


def param_counts(module) -> dict[str, int]:
    """Parameters of an SCFM module without ``dit_ema``: all, the encoder's, and the
    encoder's frozen ones (``requires_grad=False``, e.g. a frozen external BERT)."""
    total = enc = frozen = 0
    for name, p in module.named_parameters():
        if name.startswith("dit_ema."):
            continue
        total += p.numel()
        if name.startswith("encoder."):
            enc += p.numel()
            frozen += 0 if p.requires_grad else p.numel()
    return {"total_ex_ema": total, "encoder": enc, "encoder_frozen": frozen}


def tokens_per_cell(adata, tokenizer: str, model) -> tuple[str, float]:
    """Tokens the encoder reads per cell: a fixed count, or (rank, geneformer, scgpt) the
    mean of ``min(cap, expressed genes)`` (plus scGPT's ``<cls>``) over the cells."""
    from scfm_adapt.data import is_catch_all

    if tokenizer == "latent":
        n = int(model.init_kwargs_["n_tokens"])
        return f"{n}", float(n)
    if tokenizer.startswith("pathway"):
        names = model.pathway_names_
        k = sum(map(is_catch_all, names))
        return f"{len(names)} ({len(names) - k} sets + {k})", float(len(names))
    x = adata.X.tocsr() if hasattr(adata.X, "tocsr") else adata.X
    nnz = np.diff(x.indptr) if hasattr(x, "indptr") else (np.asarray(x) > 0).sum(1)
    cap = RANK_TOP_K if tokenizer == "rank" else int(model.module.encoder.max_len)
    extra = 1 if tokenizer == "scgpt" else 0  # scGPT's <cls> token comes on top
    mean = float(np.minimum(nnz, cap).mean()) + extra
    return f"≤{cap + extra} (mean {mean:.0f})", mean


def tiled(adata, n: int):
    """``n`` cells: ``adata`` repeated as often as needed (unique cell names)."""
    import anndata as ad

    reps = math.ceil(n / adata.n_obs)
    big = ad.concat([adata] * reps, index_unique="-") if reps > 1 else adata.copy()
    return big[:n].copy()


def embed_throughput(model, adata, n_cells: int = THROUGHPUT_CELLS, repeats: int = 3) -> float:
    """Cells/s of ``model.get_latent_representation`` on ``n_cells`` cells (median of
    ``repeats`` timed calls after one untimed warm-up, which also registers the AnnData)."""
    big = tiled(adata, n_cells)
    model.get_latent_representation(big)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.get_latent_representation(big)
        times.append(time.perf_counter() - t0)
    return big.n_obs / float(np.median(times))


def record_error(errors: list, where: str) -> None:
    tb = traceback.format_exc()
    errors.append({"where": where, "traceback": tb})
    print(f"  !! {where} raised:\n{tb}", flush=True)


# =========================================================================== annotation
def pretrain(
    split, tokenizer: str, epochs: int, backbones: dict[str, Path], n_residual: int | None
):
    """Stage 1 on the train cells, ``epochs`` epochs without early stopping."""
    import scfm_adapt as sfa

    reset_seeds(split.seed)
    train = split.train.copy()
    sfa.model.SCFM.setup_anndata(train, batch_key=split.batch_key)
    t0 = time.perf_counter()
    model = sfa.model.SCFM(train, **scfm_kwargs(tokenizer, backbones, n_residual))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, stage="vae", enable_progress_bar=False, early_stopping=False)
    return model, build_s, time.perf_counter() - t0


def fit_annotator(split, strategy: str, pretrained, max_epochs: int):
    """``annotation.scfm_annotator`` with the annotator kept (for attributions and the full
    parameter report)."""
    reset_seeds(split.seed)
    result, ann = scfm_annotator(split, strategy, pretrained, max_epochs, return_annotator=True)
    rep = ann.parameter_report()
    result.method = strategy
    return ann, result, {k: (float(v) if k == "fraction" else int(v)) for k, v in rep.items()}


def pathway_attributions(ann, split) -> dict[str, Any]:
    """Top-5 pathways by mean |attribution| per cell type, the catch-all tokens' share, and
    the completeness gap."""
    from scfm_adapt.data import is_catch_all

    test = split.test
    labels = test.obs[split.label_key].astype(str).to_numpy()
    per_type, gaps, sums = {}, [], []
    t0 = time.perf_counter()
    for cell_type in ATTRIBUTION_TYPES:
        idx = np.flatnonzero(labels == cell_type)[:ATTRIBUTION_CELLS]
        if idx.size == 0:
            continue
        df = ann.get_pathway_attributions(test, indices=idx, label=cell_type, n_steps=32)
        mean_abs = df.abs().mean(0).sort_values(ascending=False)
        catch = [c for c in mean_abs.index if is_catch_all(c)]
        per_type[cell_type] = {
            "n_cells": int(idx.size),
            # the catch-all tokens' part of the summed mean |attribution| (issue 28: < 20%)
            "catch_all_share": float(mean_abs[catch].sum() / mean_abs.sum()),
            "top5": [[str(k), float(v)] for k, v in mean_abs.head(5).items()],
            "mean_signed_top5": [float(df[k].mean()) for k in mean_abs.head(5).index],
        }
        gaps.append(np.abs(np.asarray(df.attrs["completeness_gap"], dtype=float)))
        sums.append(np.abs(df.sum(1).to_numpy(dtype=float)))
        finite = np.isfinite(df.to_numpy()).all()
        per_type[cell_type]["all_finite"] = bool(finite)
    gap, rowsum = np.concatenate(gaps), np.concatenate(sums)
    return {
        "per_type": per_type,
        "n_cells": int(gap.size),
        "median_abs_gap": float(np.median(gap)),
        "median_abs_row_sum": float(np.median(rowsum)),
        "relative_gap": float(np.median(gap) / np.median(rowsum)),
        "seconds": time.perf_counter() - t0,
    }


def run_annotation(name: str, args, workdir: Path, out: dict) -> list[str]:
    split = load_split(name, args.seed)
    print(f"\n## Annotation: {name}\n\n{split.description}\n", flush=True)
    rows, tok_rows, attributions, report = [], [], {}, []
    for fn in (logreg_hvg, knn_pca):
        row = evaluate(fn(split), split)
        row["tokenizer"] = "baseline"
        rows.append(row)
        print(f"  {row['method']}: {row['wall_s']:.1f} s; {row['notes']}", flush=True)
    backbones = write_backbones(workdir, name, split.train.var_names, args.tokenizers)
    all_cells = None
    for tok in args.tokenizers:
        info: dict[str, Any] = {"tokenizer": tok}
        try:
            model, build_s, pre_s = pretrain(
                split, tok, args.pretrain_epochs, backbones, args.n_residual
            )
            info.update(build_s=build_s, pretrain_s=pre_s, pretrain_epochs=args.pretrain_epochs)
            info["tokens"], info["tokens_mean"] = tokens_per_cell(split.train, tok, model)
            info.update(param_counts(model.module))
            if all_cells is None:
                import anndata as ad

                all_cells = ad.concat([split.train, split.test], index_unique="-")
            info["embed_cells_per_s"] = embed_throughput(model, all_cells)
            print(
                f"  [{tok}] built {build_s:.1f} s, pretrained {pre_s:.1f} s "
                f"({args.pretrain_epochs} epochs), tokens {info['tokens']}, "
                f"params {info['total_ex_ema']:,} (encoder {info['encoder']:,}, frozen "
                f"{info['encoder_frozen']:,}), embed {info['embed_cells_per_s']:,.0f} cells/s",
                flush=True,
            )
        except Exception:
            record_error(out["errors"], f"annotation {name} {tok}: pretraining")
            tok_rows.append(info)
            continue
        info["annotators"] = {}
        for strategy in args.strategies:
            try:
                ann, result, rep = fit_annotator(split, strategy, model, args.annot_epochs)
                row = evaluate(result, split)
                row["method"] = f"scfm[{tok}] {strategy}"
                row["tokenizer"], row["strategy"], row["parameter_report"] = tok, strategy, rep
                rows.append(row)
                info["annotators"][strategy] = rep | {"wall_s": result.wall_s}
                print(
                    f"  [{tok}] {strategy}: acc {row['accuracy']:.3f}, F1 "
                    f"{row['macro_f1']:.3f}, {row['wall_s']:.1f} s; trainable {rep['trainable']:,}"
                    f" (adapter {rep['adapter']:,} + head {rep['head']:,} = "
                    f"{rep['fraction']:.2%} of {rep['backbone']:,}); {row['notes']}",
                    flush=True,
                )
            except Exception:
                record_error(out["errors"], f"annotation {name} {tok} {strategy}")
                continue
            if tok.startswith("pathway") and strategy == "lora" and name == "pbmc68k":
                try:
                    attributions[tok] = pathway_attributions(ann, split)
                    a = attributions[tok]
                    shares = ", ".join(
                        f"{t} {v['catch_all_share']:.1%}" for t, v in a["per_type"].items()
                    )
                    print(
                        f"  [{tok}] attributions: {a['n_cells']} cells in {a['seconds']:.1f} s, "
                        f"median |gap| {a['median_abs_gap']:.2e} / median |row sum| "
                        f"{a['median_abs_row_sum']:.2e} = {a['relative_gap']:.2e}; catch-all "
                        f"share {shares}",
                        flush=True,
                    )
                except Exception:
                    record_error(out["errors"], f"annotation {name} {tok} attributions")
        tok_rows.append(info)

    # ------------------------------------------------------------------ tables
    quality = format_table(rows)
    headers = [
        "tokenizer",
        "tokens / cell",
        "SCFM params (no dit_ema)",
        "encoder params",
        "of which frozen",
        "pretrain s",
        "s / epoch",
        "embed cells/s",
        *(f"{s} trainable" for s in args.strategies),
        *(f"{s} wall s" for s in args.strategies),
    ]
    body = []
    for info in tok_rows:
        anns = info.get("annotators", {})
        body.append(
            [
                info["tokenizer"],
                info.get("tokens", "n/a"),
                fmt(info.get("total_ex_ema"), ","),
                fmt(info.get("encoder"), ","),
                fmt(info.get("encoder_frozen"), ","),
                fmt(info.get("pretrain_s"), ".1f"),
                fmt(
                    info["pretrain_s"] / info["pretrain_epochs"] if "pretrain_s" in info else None,
                    ".2f",
                ),
                fmt(info.get("embed_cells_per_s"), ",.0f"),
                *(fmt(anns.get(s, {}).get("trainable"), ",") for s in args.strategies),
                *(fmt(anns.get(s, {}).get("wall_s"), ".1f") for s in args.strategies),
            ]
        )
    cost = markdown_table(headers, body)
    report += [
        f"### Annotation: {name}",
        "",
        split.description,
        "",
        f"SCFM stage 1: {args.pretrain_epochs} epochs (no early stopping) on the train cells; "
        f"annotators at most {args.annot_epochs} epochs (early stopping). Rows `scfm[tokenizer]"
        " strategy`; `geneformer` = random frozen BERT, `scgpt` = random frozen scGPT (speed and "
        "size only).",
        "",
        quality,
        "",
        "Cost per tokenizer (embed = `SCFM.get_latent_representation`, "
        f"{THROUGHPUT_CELLS:,} cells, median of 3):",
        "",
        cost,
        "",
    ]
    for tok, a in attributions.items():
        lines = [
            f"Pathway attributions, `{tok}` + LoRA annotator ({a['n_cells']} test cells, logit "
            f"of the true type, n_steps=32): median |completeness gap| {a['median_abs_gap']:.2e}"
            f" vs median |row sum| {a['median_abs_row_sum']:.2e} "
            f"(ratio {a['relative_gap']:.1e}).",
            "",
        ]
        body = []
        for cell_type, d in a["per_type"].items():
            for rank, ((path, v), signed) in enumerate(zip(d["top5"], d["mean_signed_top5"]), 1):
                body.append(
                    [
                        f"{cell_type} (n={d['n_cells']})",
                        str(rank),
                        path,
                        f"{v:.4f}",
                        f"{signed:+.4f}",
                    ]
                )
        lines.append(
            markdown_table(["cell type", "#", "pathway", "mean abs attr", "mean attr"], body)
        )
        report += [*lines, ""]
    text = "\n".join(report)
    print("\n" + text, flush=True)
    out["annotation"][name] = {
        "description": split.description,
        "rows": [{k: v for k, v in r.items()} for r in rows],
        "tokenizers": tok_rows,
        "attributions": attributions,
    }
    return report


# =========================================================================== perturbation
def scfm_perturbation(task: dict, tokenizer: str, backbones, args, seed: int = 0):
    """One PerturbationModel with ``tokenizer``; predictions, timings and extras."""
    import scfm_adapt as sfa

    L = sfa.metrics.lognorm
    setup = task["setup"]
    keys = setup.get("covariate_keys", [])
    train = task["train"].copy()
    reset_seeds(seed)
    sfa.model.PerturbationModel.setup_anndata(train, **setup)
    # the heads alone (the tokenizers were compared on them; the anchored default's
    # anchor does not depend on the tokenizer)
    model = sfa.model.PerturbationModel(
        train,
        gene_features=task["features"],
        anchor=None,
        **scfm_kwargs(tokenizer, backbones, args.n_residual),
    )
    # PerturbationModel.train(max_epochs=E) trains the backbone exactly like this, then the
    # heads; split in two calls so that the two parts are timed separately.
    t = time.perf_counter()
    model.backbone.train(max_epochs=args.pert_epochs, stage="vae", enable_progress_bar=False)
    backbone_s = time.perf_counter() - t
    t = time.perf_counter()
    model.train(head_steps=args.head_steps, progress=False, seed=seed, train_backbone=False)
    heads_s = time.perf_counter() - t
    preds, cover, width, ood = {}, [], [], {}
    for (p, ctx), (ctrl, true) in task["test"].items():
        u = unit_name(p, ctx)
        cov = {keys[0]: ctx} if keys else None
        out = model.predict_perturbation(ctrl, p, covariates=cov, seed=seed)
        preds[u] = L(out)
        dt = L(true).mean(0) - L(ctrl).mean(0)
        lo = out.varm["scfm_delta_lower"].iloc[:, 0].to_numpy()
        hi = out.varm["scfm_delta_upper"].iloc[:, 0].to_numpy()
        cover.append(float(np.mean((dt >= lo) & (dt <= hi))))
        width.append(float(np.mean(hi - lo)))
        ood[u] = float(out.obs["ood_score"].iloc[0])
    head_params = sum(p.numel() for h in model.heads for p in h.parameters())
    extras = {
        "backbone_s": backbone_s,
        "heads_s": heads_s,
        "oob_pearson": float(model.calibration_["oob_pearson"]),
        "coverage": cover,
        "width": width,
        "ood": ood,
        "head_params": int(head_params),
        **param_counts(model.backbone.module),
    }
    return model, preds, extras


def run_perturbation(args, workdir: Path, out: dict) -> list[str]:
    import scfm_adapt as sfa

    print("\n## Perturbation: kang", flush=True)
    units = [t for t in kang_units() if t["name"] in {f"kang[{u}]" for u in args.kang_units}]
    if not units:
        raise ValueError(f"No Kang unit among {args.kang_units}.")
    full = sfa.datasets.kang2018_ifnb()
    backbones = write_backbones(workdir, "kang", full.var_names, args.tokenizers)
    all_scores, tok_info = [], {t: {"units": {}} for t in args.tokenizers}
    deltas, true_d, ceil_d, base_secs = {}, {}, {}, {}
    for task in units:
        t0 = time.perf_counter()
        preds, truth, ctrls, scvi_s = baseline_predictions(task, args.scvi_epochs)
        base_secs[task["name"]] = scvi_s
        print(
            f"  {task['name']}: baselines {time.perf_counter() - t0:.0f} s "
            f"(scVI {args.scvi_epochs} epochs {scvi_s:.0f} s)",
            flush=True,
        )
        for tok in args.tokenizers:
            method = f"scfm[{tok}]"
            try:
                model, p_tok, extras = scfm_perturbation(task, tok, backbones, args)
            except Exception:
                record_error(out["errors"], f"perturbation {task['name']} {tok}")
                continue
            preds[method] = p_tok
            info = tok_info[tok]
            info["units"][task["name"]] = extras
            if "embed_cells_per_s" not in info:  # once, on the first unit's backbone
                try:
                    info["embed_cells_per_s"] = embed_throughput(model.backbone, full)
                except Exception:
                    record_error(out["errors"], f"perturbation {tok} throughput")
            print(
                f"  {task['name']} [{tok}]: backbone {extras['backbone_s']:.1f} s, heads "
                f"{extras['heads_s']:.1f} s, OOB Pearson {extras['oob_pearson']:.3f}, "
                f"coverage {np.mean(extras['coverage']):.3f}, params {extras['total_ex_ema']:,}",
                flush=True,
            )
        reference = training_reference(task)
        scores = sfa.metrics.evaluate_predictions(preds, truth, ctrls, reference)
        ceil, ceil_pred_d, ceil_true_d = ceiling_scores(task, 0, reference)
        scores = pd.concat([scores, ceil], ignore_index=True)
        scores["task"] = task["name"]
        all_scores.append(scores)
        for m, d in preds.items():
            deltas.setdefault(m, {}).update({u: v.mean(0) - ctrls[u].mean(0) for u, v in d.items()})
        deltas.setdefault("ceiling", {}).update(ceil_pred_d)
        true_d.update({u: truth[u].mean(0) - ctrls[u].mean(0) for u in truth})
        ceil_d.update(ceil_true_d)
    scores = pd.concat(all_scores, ignore_index=True)
    unit_list = list(true_d)
    if len(unit_list) >= 2:  # rank among the scored units (across folds), as perturbation.py
        for m, d in deltas.items():
            if not all(u in d for u in unit_list):
                continue
            ref = ceil_d if m == "ceiling" else true_d
            r = sfa.metrics.rank_metric(
                np.stack([d[u] for u in unit_list]), np.stack([ref[u] for u in unit_list])
            )
            for u, v in zip(unit_list, r):
                scores.loc[(scores["method"] == m) & (scores["unit"] == u), "rank"] = v
    summary = sfa.metrics.summarize(scores.drop(columns=["task"]))
    # methods missing a unit (a crash) would be averaged over fewer units: mark them
    n_units = scores.groupby("method")["unit"].nunique()

    metrics = ["pearson_delta", "pearson_delta_top20", "r2_top100", "cosine_lfc", "energy"]
    if len(unit_list) >= 2:
        metrics.append("rank")
    headers = ["method", *metrics, "units", "backbone s", "heads s", "OOB Pearson", "90% coverage"]
    body = []
    for m in summary.index:
        tok = m[len("scfm[") : -1] if m.startswith("scfm[") else None
        row = [m + (" (reference: means)" if m == "scvi_arith_mean" else "")]
        row += [fmt(float(summary.loc[m, k]), ".3f") for k in metrics]
        row.append(str(int(n_units[m])))
        if tok is not None:
            us = tok_info[tok]["units"].values()
            row += [
                fmt(float(np.mean([u["backbone_s"] for u in us])), ".1f"),
                fmt(float(np.mean([u["heads_s"] for u in us])), ".1f"),
                fmt(float(np.mean([u["oob_pearson"] for u in us])), ".3f"),
                fmt(float(np.mean([c for u in us for c in u["coverage"]])), ".3f"),
            ]
        elif m == "scvi_arith":
            row += [fmt(float(np.mean(list(base_secs.values()))), ".1f"), "n/a", "n/a", "n/a"]
        else:
            row += ["n/a"] * 4
        body.append(row)
    quality = markdown_table(headers, body)

    per_unit = scores.pivot_table(
        index="method", columns="unit", values="pearson_delta_top20", sort=False
    )
    per_unit = per_unit.loc[[m for m in summary.index if m in per_unit.index]]
    per_unit_table = markdown_table(
        ["method", *per_unit.columns],
        [[m, *(fmt(float(v), ".3f") for v in per_unit.loc[m])] for m in per_unit.index],
    )

    headers = [
        "tokenizer",
        "SCFM params (no dit_ema)",
        "encoder params",
        "of which frozen",
        "response heads params",
        "backbone s / epoch",
        "embed cells/s",
    ]
    body = []
    for tok in args.tokenizers:
        info = tok_info[tok]
        us = list(info["units"].values())
        if not us:
            body.append([tok] + ["n/a"] * 6)
            continue
        body.append(
            [
                tok,
                fmt(us[0]["total_ex_ema"], ","),
                fmt(us[0]["encoder"], ","),
                fmt(us[0]["encoder_frozen"], ","),
                fmt(us[0]["head_params"], ","),
                fmt(float(np.mean([u["backbone_s"] for u in us])) / args.pert_epochs, ".2f"),
                fmt(info.get("embed_cells_per_s"), ",.0f"),
            ]
        )
    cost = markdown_table(headers, body)
    report = [
        "### Perturbation: kang",
        "",
        f"Held-out units: {', '.join(t['name'] for t in units)} ({len(units)} of 5; "
        f"`--kang-units`). SCFM backbone {args.pert_epochs} epochs, {args.head_steps} steps per "
        f"response head (5 heads), scVI {args.scvi_epochs} epochs, seed 0. Means over the "
        "units; `geneformer` = random frozen BERT, `scgpt` = random frozen scGPT (speed and size "
        "only).",
        "",
        quality,
        "",
        "Top-20 `pearson_delta` per unit:",
        "",
        per_unit_table,
        "",
        "Cost per tokenizer (times are means over units; embed = the first unit's backbone, "
        f"`get_latent_representation` on {THROUGHPUT_CELLS:,} Kang cells, median of 3):",
        "",
        cost,
        "",
    ]
    print("\n" + "\n".join(report), flush=True)
    out["perturbation"] = {
        "units": [t["name"] for t in units],
        "scores": scores.to_dict(orient="records"),
        "tokenizers": tok_info,
        "scvi_seconds": base_secs,
    }
    return report


# =========================================================================== main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["annotation", "perturbation"],
        choices=["annotation", "perturbation"],
    )
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=TOKENIZERS)
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["pbmc68k"],
        choices=DATASETS,
        help="annotation data sets (cellbench3 has 15,073 genes: slow)",
    )
    parser.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=list(ANNOTATOR)
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=30,
        help="SCFM stage-1 epochs before annotation (no early stopping)",
    )
    parser.add_argument("--annot-epochs", type=int, default=20, help="annotator max epochs")
    parser.add_argument(
        "--pert-epochs", type=int, default=15, help="PerturbationModel backbone epochs"
    )
    parser.add_argument("--head-steps", type=int, default=300)
    parser.add_argument("--scvi-epochs", type=int, default=100)
    parser.add_argument(
        "--kang-units",
        nargs="+",
        default=["B cells", "CD14+ Monocytes"],
        help="Kang cell types whose stimulated cells are held out (5 exist)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="annotation: the pbmc68k split's random_state and the models' seed (as in "
        "annotation.py); the perturbation section stays at seed 0",
    )
    parser.add_argument(
        "--n-residual",
        type=int,
        default=None,
        help="pathway rows: split the genes in no set into this many programme tokens "
        "(default: the tokenizer's own)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="tokenizers", help="name of the result files")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import logging

    import scvi

    quiet()
    scvi.settings.verbosity = logging.WARNING  # "attempting to transfer AnnData setup" x many
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.perf_counter()
    env = environment_info()
    env_line = "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items())
    print(env_line, flush=True)
    out: dict[str, Any] = {
        "environment": env,
        "args": vars(args),
        "annotation": {},
        "perturbation": None,
        "errors": [],
    }
    report = [
        "`"
        + " ".join(
            ["python benchmarks/tokenizer_bench.py", *(sys.argv[1:] if argv is None else argv)]
        )
        + "`",
        "",
        env_line,
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="scfm_tokenizers_") as tmp:
        workdir = Path(tmp)
        if "annotation" in args.sections:
            for name in args.datasets:
                report += run_annotation(name, args, workdir, out)
        if "perturbation" in args.sections:
            report += run_perturbation(args, workdir, out)
    total = time.perf_counter() - start
    out["total_s"] = total
    if out["errors"]:
        report += ["Errors:", ""] + [f"- {e['where']}" for e in out["errors"]] + [""]
    report.append(f"Total wall time {total:.0f} s.")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(report) + "\n")
    write_json(RESULTS / f"{args.out}.json", out)
    print(f"\nTotal {total:.1f} s; wrote {RESULTS / args.out}.md and .json", flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

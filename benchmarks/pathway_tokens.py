"""Pathway tokens: the choices behind the tokenizer's defaults, and the Kang attribution check.

Two sections:

``validation``
    Pathway-tokenizer variants compared on *training cells only*: each seed's pbmc68k train
    split (``benchmarks/_annotation.py``, stratified 70/30, ``random_state=seed``) is split
    again 75/25 (stratified, same seed); an SCFM is pretrained on the inner 75% (stage 1,
    ``--pretrain-epochs`` without early stopping) and a LoRA annotator
    (``tokenizer_bench.fit_annotator``, at most ``--annot-epochs``) is scored on the inner
    25%. The test cells are never read, so the defaults can be chosen from this table.
    Variants (``--variants``): ``default``; ``ranked16`` / ``ranked32`` (16 or 32 sets
    chosen first by their members' variance, ``n_ranked``); ``propagated`` (GO annotations
    propagated up ``is_a``/``part_of``, ``max_size=100``); ``channels1`` / ``channels8``
    (one weighted sum per set, the set's mean, or eight); ``pca4`` / ``pca8`` (member
    weights started at the sets' principal axes, 4 or 8 channels); ``random4`` (the random
    contrasts, explicitly); ``residual16`` (16 catch-all programmes); ``graph_any`` (GO gene
    graph, a single edge links two sets) and ``graph_share10`` (links need 10% of member
    pairs); ``latent`` (the latent tokenizer, for reference).
``kang``
    Kang 2018 IFN-beta, ``perturbation.py``'s units (the stimulated cells of one cell type
    held out). A :class:`~scfm_adapt.model.PerturbationModel` with ``tokenizer="pathway"``
    (its gene sets ranked first by the training perturbations' response; ``--n-ranked 0``:
    by coverage alone) is trained with the default anchor, ``--pert-epochs`` backbone
    epochs and ``--head-steps`` head steps, and scored (Pearson of the mean change on all
    genes and on the 20 most changed), then
    ``get_pathway_attributions`` explains the predicted response of up to ``--cells`` of the
    held-out type's control cells. Reported: the top 5 pathways by mean |attribution|, and
    the rank of the best interferon-signalling token (GO:0060337 or a term below it).

Usage::

    python benchmarks/pathway_tokens.py --section validation --seeds 0 1 2
    python benchmarks/pathway_tokens.py --section kang --seeds 0 1 2

Prints the tables; ``--out NAME`` also writes ``benchmarks/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import quiet

#: GO:0060337 (type I interferon signalling) and the terms GO.db 3.16 lists under it (its
#: regulation terms, linked by ``regulates``, and GO:0039502, an ``is_a`` child of one).
INTERFERON_TERMS = ("GO:0060337", "GO:0060338", "GO:0060339", "GO:0060340", "GO:0039502")
BASE = {"max_sets": 64, "min_size": 10, "max_size": 300}
VARIANTS = {
    "default": {},
    "ranked16": {"tokenizer_kwargs": {"n_ranked": 16}},
    "ranked32": {"tokenizer_kwargs": {"n_ranked": 32}},
    "propagated": {"tokenizer_kwargs": {"go_propagate": True, "max_size": 100}},
    "channels1": {"tokenizer_kwargs": {"n_channels": 1}},
    "pca4": {"tokenizer_kwargs": {"member_init": "pca"}},
    "pca8": {"tokenizer_kwargs": {"member_init": "pca", "n_channels": 8}},
    "random4": {"tokenizer_kwargs": {"member_init": "random"}},
    "channels8": {"tokenizer_kwargs": {"n_channels": 8}},
    "residual16": {"tokenizer_kwargs": {"n_residual": 16}},
    "latent": {"tokenizer": "latent"},
    "graph_any": {"gene_graph": "go", "tokenizer_kwargs": {"min_edge_share": 0.0}},
    "graph_share10": {"gene_graph": "go", "tokenizer_kwargs": {"min_edge_share": 0.1}},
}


def variant_kwargs(name: str) -> dict:
    v = VARIANTS[name]
    if v.get("tokenizer") == "latent":
        return {}
    kw = {"tokenizer": "pathway", "gene_sets": "go"}
    kw["tokenizer_kwargs"] = {**BASE, **v.get("tokenizer_kwargs", {})}
    if "gene_graph" in v:
        kw["gene_graph"] = v["gene_graph"]
    return kw


def mean_sd(values) -> str:
    a = np.asarray(values, dtype=float)
    sd = a.std(ddof=1) if a.size > 1 else float("nan")
    return f"{a.mean():.3f} ± {sd:.3f}"


def run_validation(args) -> dict:
    from sklearn.model_selection import train_test_split

    import scfm_adapt as sfa
    from _annotation import Split, evaluate, load_split
    from tokenizer_bench import fit_annotator, reset_seeds

    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        outer = load_split("pbmc68k", seed)
        tr = outer.train
        y = tr.obs[outer.label_key].astype(str).to_numpy()
        i_tr, i_va = train_test_split(
            np.arange(tr.n_obs), test_size=0.25, stratify=y, random_state=seed
        )
        inner = Split(
            "inner", tr[i_tr].copy(), tr[i_va].copy(), outer.label_key, None, "inner", seed
        )
        for name in args.variants:
            t0 = time.perf_counter()
            reset_seeds(seed)
            train = inner.train.copy()
            sfa.model.SCFM.setup_anndata(train)
            model = sfa.model.SCFM(train, **variant_kwargs(name))
            model.train(
                max_epochs=args.pretrain_epochs,
                stage="vae",
                enable_progress_bar=False,
                early_stopping=False,
            )
            _, result, _ = fit_annotator(inner, "lora", model, args.annot_epochs)
            score = evaluate(result, inner)
            cov = (
                model.pathway_coverage_
                if model.module.tokenizer == "pathway"
                else {"variance_in_sets": float("nan")}
            )
            row = {
                "seed": seed,
                "accuracy": float(score["accuracy"]),
                "macro_f1": float(score["macro_f1"]),
                "variance_in_sets": cov["variance_in_sets"],
                "graph_density": cov.get("graph_density"),
                "seconds": time.perf_counter() - t0,
            }
            rows.setdefault(name, []).append(row)
            print(
                f"seed {seed} {name:14s} accuracy {row['accuracy']:.3f} macro-F1 "
                f"{row['macro_f1']:.3f}, variance in named sets {row['variance_in_sets']:.2f}"
                + (
                    f", graph density {row['graph_density']:.2f}"
                    if row["graph_density"] is not None
                    else ""
                )
                + f" ({row['seconds']:.0f} s)",
                flush=True,
            )
    print("\n| variant | accuracy | macro-F1 | variance in named sets | graph density |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        dens = [r["graph_density"] for r in rs if r["graph_density"] is not None]
        print(
            f"| {name} | {mean_sd([r['accuracy'] for r in rs])} | "
            f"{mean_sd([r['macro_f1'] for r in rs])} | "
            f"{np.mean([r['variance_in_sets'] for r in rs]):.2f} | "
            + (f"{np.mean(dens):.2f} |" if dens else "n/a |"),
            flush=True,
        )
    return rows


def interferon_rank(names) -> int | None:
    """1-based rank of the first interferon-signalling token among ``names``."""
    for i, n in enumerate(names):
        if str(n).split(" ")[0] in INTERFERON_TERMS:
            return i + 1
    return None


def run_kang(args) -> dict:
    import scfm_adapt as sfa
    from perturbation import kang_units
    from tokenizer_bench import reset_seeds

    rows = []
    for task in kang_units():
        (key,) = task["test"]
        ct = key[1]
        if args.units and ct not in args.units:
            continue
        ctrl, _ = task["test"][key]
        for seed in args.seeds:
            t0 = time.perf_counter()
            train = task["train"].copy()
            reset_seeds(seed)
            sfa.model.PerturbationModel.setup_anndata(train, **task["setup"])
            tok_kw = dict(BASE) if args.n_ranked is None else {**BASE, "n_ranked": args.n_ranked}
            model = sfa.model.PerturbationModel(
                train,
                gene_features=None,
                tokenizer="pathway",
                gene_sets="go",
                tokenizer_kwargs=tok_kw,
            )
            model.backbone.train(
                max_epochs=args.pert_epochs, stage="vae", enable_progress_bar=False
            )
            model.train(head_steps=args.head_steps, progress=False, seed=seed, train_backbone=False)
            names = model.backbone.pathway_names_
            chosen = interferon_rank(names)
            # the prediction's quality, as perturbation.py scores it
            lognorm = sfa.metrics.lognorm
            pred = model.predict_perturbation(
                ctrl, "stim", covariates={"cluster_id": ct}, seed=seed
            )
            cells = [lognorm(a) for a in (pred, task["test"][key][1], ctrl)]
            quality = {
                "pearson_delta": sfa.metrics.pearson_delta(*cells),
                "pearson_delta_top20": sfa.metrics.pearson_delta(*cells, top_k=20),
            }
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.permutation(ctrl.n_obs)[: args.cells])
            df = model.get_pathway_attributions(
                ctrl[idx].copy(), "stim", covariates={"cluster_id": ct}, n_steps=32
            )
            order = df.abs().mean(0).sort_values(ascending=False)
            rank = interferon_rank(order.index)
            row = {
                "unit": ct,
                "seed": seed,
                "interferon_set_chosen": chosen is not None,
                "interferon_rank": rank,
                "n_tokens": len(names),
                "top5": [[str(k), float(v)] for k, v in order.head(5).items()],
                **quality,
                "genes": list(df.attrs.get("genes", [])),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"{ct} seed {seed}: interferon token chosen {row['interferon_set_chosen']}, "
                f"rank {rank} of {len(names)}; pearson_delta {quality['pearson_delta']:.3f}, "
                f"top-20 {quality['pearson_delta_top20']:.3f}; top 5: "
                + "; ".join(k for k, _ in row["top5"])
                + f" ({row['seconds']:.0f} s)",
                flush=True,
            )
    print("\n| held-out type | interferon rank (seeds) | in the top 5 | most attributed (seed 0) |")
    print("|---|---|---|---|")
    for ct in dict.fromkeys(r["unit"] for r in rows):
        rs = [r for r in rows if r["unit"] == ct]
        ranks = [r["interferon_rank"] for r in rs]
        top5 = sum(r is not None and r <= 5 for r in ranks)
        print(f"| {ct} | {ranks} | {top5} of {len(rs)} | {rs[0]['top5'][0][0]} |", flush=True)
    for key in ("pearson_delta", "pearson_delta_top20"):
        per_seed = [
            np.mean([r[key] for r in rows if r["seed"] == s]) for s in dict.fromkeys(args.seeds)
        ]
        print(f"{key}, mean over units, seeds {args.seeds}: {mean_sd(per_seed)}", flush=True)
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", choices=("validation", "kang"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--annot-epochs", type=int, default=20)
    parser.add_argument("--pert-epochs", type=int, default=15)
    parser.add_argument("--head-steps", type=int, default=300)
    parser.add_argument("--cells", type=int, default=100, help="control cells explained")
    parser.add_argument("--units", nargs="+", default=None, help="Kang cell types (default all)")
    parser.add_argument(
        "--n-ranked", type=int, default=None, help="kang: n_ranked (default: the model's own)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    quiet()
    out = run_validation(args) if args.section == "validation" else run_kang(args)
    if args.out:
        path = Path(__file__).parent / "results" / f"{args.out}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "results": out}, indent=1, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

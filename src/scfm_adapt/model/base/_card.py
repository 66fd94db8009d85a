"""The model card: a ``README.md`` written beside the weights of every saved model.

A saved folder must tell a reader, without loading anything, what the model is and what
it was trained on: the genes, the training data (cells, genes, source file and a checksum
of the counts), the covariates, the likelihood and sizes, the training time per stage, the
library version and the figures of the model's own evaluation. The card is rendered from
the checkpoint's config (``config["card"]`` holds what the config has nowhere else). It is
for people and is left out of the checksum manifest, so that editing it (as model hubs
invite) never makes the model unloadable; the config stays the record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: How many gene names the card lists before "... and N more".
N_GENES_SHOWN = 20


def data_record(adata, matrix, name: str | None = None) -> dict:
    """What the card says of one training data set: its cells and genes, the file it was
    read from (backed AnnData), and a place for the SHA-256 of its counts (``None``: a pass
    over the data, taken at save by :func:`~scfm_adapt.data.counts_sha256`)."""
    filename = getattr(adata, "filename", None)
    record = {
        "name": name or (Path(filename).name if filename else "AnnData in memory"),
        "n_cells": int(adata.n_obs),
        "n_genes": int(matrix.shape[1]),
        "counts_sha256": None,
    }
    if filename:
        record["file"] = str(filename)
    return record


def _categories(registry: dict, field: str) -> list[str]:
    state = registry.get("field_registries", {}).get(field, {}).get("state_registry", {})
    mapping = state.get("categorical_mapping")
    return [] if mapping is None else [str(c) for c in mapping]


def _covariates(registry: dict) -> list[str]:
    args = registry.get("setup_args", {})
    lines = []
    for what, key, field in (("batch", "batch_key", "batch"), ("labels", "labels_key", "labels")):
        if args.get(key):
            cats = _categories(registry, field)
            shown = ", ".join(cats[:10]) + (f", ... ({len(cats)} in all)" if len(cats) > 10 else "")
            lines.append(f"- {what}: `obs[{args[key]!r}]` ({shown})")
    for key in args.get("categorical_covariate_keys") or []:
        lines.append(f"- categorical covariate: `obs[{key!r}]`")
    for key in args.get("continuous_covariate_keys") or []:
        lines.append(f"- continuous covariate: `obs[{key!r}]`")
    for key in ("perturbation_key", "control_group", "dose_key"):
        if args.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{args[key]}`")
    if args.get("layer"):
        lines.append(f"- counts read from `layers[{args['layer']!r}]`")
    return lines or ["- none (every cell is one batch)"]


def _last(history: dict, key: str) -> float | None:
    table = history.get(key)
    if table is None:
        return None
    try:
        values = np.asarray(table.to_numpy() if hasattr(table, "to_numpy") else table, float)
    except (TypeError, ValueError):
        return None
    values = values[np.isfinite(values)]
    return float(values.ravel()[-1]) if values.size else None


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _backbone(init: dict) -> list[str]:
    """The external backbone's line: what it was built from, and how well the genes fit."""
    opts = init.get("tokenizer_options") or {}
    if not opts.get("sha256"):
        return []
    line = (
        f"- external backbone: {init.get('tokenizer')} from `{opts.get('source', '?')}` "
        f"(weights SHA-256 `{str(opts['sha256'])[:16]}`)"
    )
    report = opts.get("vocab_report") or {}
    if report:
        share = report.get("count_share")
        counts = f", {100 * share:.1f}% of the counts" if share is not None else ""
        line += (
            f"; {report.get('n_in_vocab')} of {report.get('n_genes')} genes in its "
            f"vocabulary{counts}"
        )
    return [line]


def render_card(config: dict, n_parameters: int) -> str:
    """The card's markdown, from a checkpoint's ``config`` and the number of weights."""
    model = config.get("model", "model")
    card = config.get("card", {})
    init = config.get("init_kwargs", {})
    genes = [str(g) for g in config.get("var_names") or []]
    registry = config.get("registry", {})
    out = [
        f"# {model} (scfm_adapt {config.get('scfm_adapt_version', '?')})",
        "",
        "Saved by scfm_adapt: `model.safetensors` (tensors only) and `config.json` "
        "(everything else, with the SHA-256 of every file). Load it with",
        "",
        "```python",
        "import scfm_adapt as sfa",
        f'model = sfa.model.{model}.load("path/to/this/folder", adata=adata)',
        "```",
        "",
        "## Genes",
        "",
    ]
    if genes:
        shown = ", ".join(genes[:N_GENES_SHOWN])
        more = f", ... and {len(genes) - N_GENES_SHOWN} more" if len(genes) > N_GENES_SHOWN else ""
        out.append(
            f"{len(genes)} genes, in this order (all in `config.json`, `var_names`): {shown}{more}."
        )
    else:
        out.append("The genes are those of the backbone (see `config.json`).")
    out += ["", "## Training data", ""]
    data = card.get("training_data") or []
    if data:
        out.append("| data | cells | genes | SHA-256 (of the file; else of the counts) |")
        out.append("|---|---:|---:|---|")
        for d in data:
            where = f" (`{d['file']}`)" if d.get("file") else ""
            sha = d.get("file_sha256") or d.get("counts_sha256") or "not taken"
            out.append(
                f"| {d.get('name', '?')}{where} | {d.get('n_cells', '?')} | "
                f"{d.get('n_genes', '?')} | `{sha[:16]}` |"
            )
        out.append("")
        out.append("Checksums are the first 16 hex digits of the SHA-256 (full in `config.json`).")
    else:
        out.append("Not recorded (an untrained model, or one saved before model cards).")
    out += ["", "## Covariates", "", *_covariates(registry), "", "## Model", ""]
    likelihood = init.get("gene_likelihood")
    sizes = [f"{k} = {_fmt(v)}" for k, v in init.items() if not isinstance(v, dict | list)]
    if likelihood:
        out.append(f"- likelihood: {str(likelihood).upper()}")
    out.append(f"- weights: {n_parameters:,} numbers")
    out += _backbone(init)
    if sizes:
        out.append(f"- arguments: {'; '.join(sizes)}")
    stages = config.get("trained_stages")
    if stages is not None:
        out.append(f"- trained stages: {', '.join(stages) or 'none'}")
    out += ["", "## Training", ""]
    seconds = card.get("training_seconds") or {}
    if seconds:
        for stage, s in seconds.items():
            out.append(f"- {stage}: {s:.0f} s")
    else:
        out.append("- time not recorded")
    history = config.get("history") or {}
    if isinstance(history, dict) and history:
        nested = all(isinstance(v, dict) for v in history.values())
        for stage, h in history.items() if nested else [("training", history)]:
            last = {k: _last(h, k) for k in ("train_loss", "validation_loss")}
            shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if v is not None)
            if shown:
                out.append(f"- {stage}, last epoch: {shown}")
    out += ["", "## Evaluation", ""]
    figures = card.get("evaluation") or {}
    if figures:
        out.append("| figure | value |")
        out.append("|---|---:|")
        out += [f"| {k} | {_fmt(v)} |" for k, v in figures.items()]
    else:
        out.append(
            "No evaluation recorded. Record figures with `model.record_evaluation(...)` "
            "before saving; the validation losses above are the training's own."
        )
    return "\n".join(out) + "\n"

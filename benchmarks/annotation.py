"""Cell annotation benchmark: SCFM adaptation strategies against simple baselines.

For each data set (``benchmarks/_annotation.py`` defines the splits and baselines), an
SCFM is pretrained self-supervised on the *training* cells only (no labels, stage 1, the
part an annotator uses), then a :class:`~scfm_adapt.model.CellAnnotator` is fitted with
each adaptation strategy. Baselines run on the same split: logistic regression on
log-normalised HVGs selected on train, kNN on PCA, scVI + kNN and SCANVI.

    python benchmarks/annotation.py                      # all data sets, all methods
    python benchmarks/annotation.py --datasets kang8 --methods logreg_hvg lora

Prints one markdown table per data set: accuracy, macro-F1, ECE (15 bins), NLL, trainable
parameters and wall time (pretraining is reported once, separately: it is shared by all
strategies). Accuracy and F1 use the most probable known type (no OOD flagging); the share
of test cells the annotator flags as unknown is in the notes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _annotation import (
    BASELINES,
    DATASETS,
    Result,
    Split,
    evaluate,
    format_per_class,
    format_table,
    load_split,
)
from _common import environment_info, quiet

STRATEGIES = ("linear_probe", "lora", "adapter", "partial", "full")
RESULTS = Path(__file__).parent / "results"
PRETRAIN_EPOCHS = 60
ANNOTATOR = {
    "linear_probe": {"lr": 3e-3},
    "lora": {"lr": 1e-3, "rank": 8, "target_modules": None},
    "adapter": {"lr": 1e-3},
    "partial": {"lr": 1e-3},
    "full": {"lr": 5e-4},
}


def pretrain(split: Split, epochs: int = PRETRAIN_EPOCHS):
    """SCFM stage 1 on the training cells (cached in benchmarks/results/)."""
    import scfm_adapt as sfa

    path = RESULTS / f"pretrained_{split.name}_{epochs}"
    train = split.train.copy()
    if path.exists():
        return sfa.model.SCFM.load(path), 0.0
    t0 = time.perf_counter()
    sfa.model.SCFM.setup_anndata(train, batch_key=split.batch_key)
    model = sfa.model.SCFM(train)
    model.train(max_epochs=epochs, stage="vae", enable_progress_bar=False, early_stopping=True)
    wall = time.perf_counter() - t0
    model.save(path, overwrite=True)
    return model, wall


def scfm_annotator(
    split: Split,
    strategy: str,
    pretrained,
    max_epochs: int = 40,
    return_annotator: bool = False,
    **overrides,
):
    """A CellAnnotator with ``strategy`` on ``pretrained``, scored on the split's test cells:
    a :class:`Result` (and the annotator, with ``return_annotator``)."""
    import scfm_adapt as sfa

    t0 = time.perf_counter()
    train = split.train.copy()
    sfa.model.CellAnnotator.setup_anndata(train, labels_key=split.label_key)
    opts = {**ANNOTATOR[strategy], **overrides}
    lr = opts.pop("lr")
    opts = {k: v for k, v in opts.items() if v is not None}
    ann = sfa.model.CellAnnotator(train, pretrained=pretrained, strategy=strategy, **opts)
    ann.train(max_epochs=max_epochs, lr=lr, enable_progress_bar=False)
    table, probs = ann.predict_details(split.test)
    wall = time.perf_counter() - t0
    rep = ann.parameter_report()
    result = Result(
        method=f"scfm_{strategy}",
        proba=probs.to_numpy(),
        classes=list(probs.columns),
        trainable_params=int(rep["trainable"]),
        wall_s=wall,
        notes=(
            f"adapter {rep['adapter']:,} + head {rep['head']:,} = {rep['fraction']:.2%} of "
            f"backbone {rep['backbone']:,}; T={ann.calibration_['temperature']:.2f}; "
            f"flagged unknown {table['is_ood'].mean():.1%}; "
            f"epochs {len(ann.history_['elbo_train'])}"
        ),
    )
    return (result, ann) if return_annotator else result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    methods = list(BASELINES) + list(STRATEGIES)
    parser.add_argument("--methods", nargs="+", choices=methods, default=methods)
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    parser.add_argument("--epochs", type=int, default=40, help="annotator max epochs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import scvi
    import torch

    torch.set_num_threads(args.threads)
    scvi.settings.seed = 0
    quiet()
    print("Environment: " + ", ".join(f"{k} {v}" for k, v in environment_info().items()))
    start = time.perf_counter()
    for name in args.datasets:
        split = load_split(name)
        print(f"\n## {name}\n\n{split.description}\n", flush=True)
        rows = []
        pretrained = None
        for method in args.methods:
            if method in BASELINES:
                result = BASELINES[method](split)
            else:
                if pretrained is None:
                    pretrained, wall = pretrain(split, args.pretrain_epochs)
                    print(f"  pretraining SCFM (stage 1, train cells): {wall:.1f} s", flush=True)
                scvi.settings.seed = 0
                result = scfm_annotator(split, method, pretrained, args.epochs)
            row = evaluate(result, split)
            rows.append(row)
            print(f"  {method}: {row['wall_s']:.1f} s; {row['notes']}", flush=True)
        print("\n" + format_table(rows) + "\n", flush=True)
        if name == "kang8":
            for row in rows:
                print(
                    f"Per-class F1 of {row['method']}:\n\n{format_per_class(row['per_class_f1'])}\n"
                )
    print(f"\nTotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

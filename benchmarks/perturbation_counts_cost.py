"""What predicting *counts* costs a shift baseline on the Norman combinations task.

The additive baseline of ``perturbation.py`` predicts log-normalised cells (control cells +
delta). A model that outputs counts, as ``PerturbationModel`` does, has to turn such a
shift into integers. This script scores the additive baseline three ways on the held-out
combinations of ``norman_combo`` (the same split):

- ``additive``: control cells + delta, log-normalised (as in ``perturbation.py``);
- ``additive_expected``: the shifted expression as expected counts
  (``expm1(log1p(x * s) + delta) / s``, ``s = 1e4 / library``), not rounded;
- ``additive_counts``: the same, rounded up or down at random with the chance that keeps
  each count's mean (what ``PerturbationModel(anchor="expression")`` does).

``python benchmarks/perturbation_counts_cost.py [--seed 0]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(argv=None) -> None:
    import torch

    import perturbation as P
    import scfm_adapt as sfa
    from _common import quiet
    from scfm_adapt.model._perturbation import _round_counts

    quiet()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the rounding")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    B, L = sfa.baselines, sfa.metrics.lognorm
    task = next(P.norman_combo_units())
    setup = task["setup"]
    keys = setup.get("covariate_keys", [])
    table = B.PerturbationTable(
        task["train"], setup["perturbation_key"], setup["control_group"], keys
    )
    preds = {"additive": {}, "additive_expected": {}, "additive_counts": {}}
    truth, ctrls = {}, {}
    for (p, ctx), (ctrl, true) in task["test"].items():
        unit = P.unit_name(p, ctx)
        lc, lt = L(ctrl), L(true)
        truth[unit], ctrls[unit] = lt, lc
        delta = B.additive_delta(table, p, ctx)
        preds["additive"][unit] = B.shifted_cells(lc, delta)
        x = ctrl.X.toarray() if hasattr(ctrl.X, "toarray") else ctrl.X
        x = torch.as_tensor(x, dtype=torch.float32)
        scale = 1e4 / x.sum(-1, keepdim=True)
        shifted = torch.log1p(x * scale) + torch.as_tensor(delta, dtype=torch.float32)
        expected = torch.expm1(shifted).clamp(min=0) / scale
        preds["additive_expected"][unit] = L(expected.numpy())
        preds["additive_counts"][unit] = L(_round_counts(expected).numpy())
    scores = sfa.metrics.evaluate_predictions(
        preds, truth, ctrls, P.training_reference(task, args.seed)
    )
    print(sfa.metrics.summarize(scores).round(3).to_string())


if __name__ == "__main__":
    main()

"""Write ``perturbation_two_folders/`` and its expected prediction: a tiny PerturbationModel
saved in the layout of scfm_adapt before the one save/load (commit 833184c: ``backbone/``
and ``response/`` folders), for ``test_a_perturbation_model_saved_in_the_two_folder_layout``.

Run with that commit's code, from a checkout of it::

    git worktree add /tmp/scfm-833184c 833184c
    PYTHONPATH=/tmp/scfm-833184c/src:/tmp/scfm-833184c/tests \\
        python tests/data/make_perturbation_two_folders.py tests/data
"""

import json
import sys
from pathlib import Path

import scvi
import torch

import scfm_adapt as sfa
from test_perturbation import make_perturbation_adata

TINY = {
    "n_tokens": 2,
    "token_dim": 4,
    "encoder_hidden": 8,
    "encoder_depth": 1,
    "n_heads": 2,
    "decoder_hidden": 16,
    "dit_hidden": 16,
    "dit_depth": 1,
    "dit_heads": 2,
    "gene_likelihood": "poisson",
}


def main(out: Path) -> None:
    torch.set_num_threads(2)
    scvi.settings.seed = 0
    a = make_perturbation_adata(n_per_group=20, n_genes=20)
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    m = sfa.model.PerturbationModel(
        a, gene_features=None, n_ensemble=2, hidden=16, emb_dim=8, **TINY
    )
    m.train(
        max_epochs=2, head_steps=10, progress=False, calibration_cells=16, enable_progress_bar=False
    )
    m.save(out / "perturbation_two_folders")
    keep = ((a.obs["condition"] == "control") & (a.obs["context"] == "ctx0")).to_numpy()
    pred = m.predict_perturbation(a[keep].copy(), ["A", "A+B"], seed=0)
    expected = {
        "delta": pred.varm["scfm_delta"].to_numpy().tolist(),
        "upper": pred.varm["scfm_delta_upper"].to_numpy().tolist(),
        "X_sum": float(pred.X.sum()),
        "commit": "833184c",
    }
    (out / "perturbation_two_folders_expected.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

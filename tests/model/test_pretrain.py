"""Pretraining across files with different genes: per-batch gene panels in the model,
``pretrain`` / ``scfm-adapt pretrain`` (model card, resume), and a query with 60% of the
genes mapped onto the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import sparse

import scfm_adapt as sfa
from conftest import TINY, make_adata, write_panels
from scfm_adapt.data import BATCH_GENE_MASKS

FAST = dict(enable_progress_bar=False, early_stopping=False, batch_size=32)
#: The arguments of the tiny pretraining run (the fixture's, and its resumption's).
RUN = dict(
    labels_key="cell_type",
    max_epochs=2,
    model_kwargs=TINY,
    train_kwargs={**FAST, "prior_steps": 4},
    progress=False,
)


def _panel_adata():
    """In memory: two batches of toy counts, batch b1 measuring only genes 0-19."""
    a = make_adata(n_cells=80, seed=1)
    observed = np.arange(a.n_vars) < 20
    x = a.X.toarray()
    x[np.flatnonzero(a.obs["batch"] == "b1")[:, None], np.flatnonzero(~observed)] = 0
    a.X = sparse.csr_matrix(x)
    a.uns[BATCH_GENE_MASKS] = {"batch_key": "batch", "observed": {"b1": observed}}
    return a, observed


def test_a_batchs_missing_genes_are_unobserved_not_zero():
    """Cells of a batch lacking genes: those genes' counts change neither their latent
    nor their likelihood (masked in the encoder input, the library and the NB terms),
    while the other batch's cells still see every gene."""
    import scvi

    scvi.settings.seed = 0
    a, observed = _panel_adata()
    sfa.model.SCFM.setup_anndata(a, batch_key="batch")
    m = sfa.model.SCFM(a, **TINY)
    mask = m.module.batch_gene_mask
    assert mask is not None and mask.shape == (2, 40)
    assert mask[0].all() and torch.equal(mask[1], torch.as_tensor(observed))
    assert m.batch_gene_masks_ == {"b1": list(range(20, 40))}
    m.train(max_epochs=2, stage="vae", **FAST)
    b1 = np.flatnonzero(a.obs["batch"] == "b1")
    b0 = np.flatnonzero(a.obs["batch"] == "b0")
    z = m.get_latent_representation(a)
    torch.manual_seed(0)
    err = m.get_reconstruction_error(a, indices=b1)["reconstruction_loss"]
    noisy = a.copy()
    x = noisy.X.toarray()
    rng = np.random.default_rng(0)
    x[b1[:, None], np.flatnonzero(~observed)] = rng.integers(1, 50, (b1.size, 20))
    x[b0[:5, None], np.arange(20, 25)] = 40  # b0 observes these genes
    noisy.X = sparse.csr_matrix(x)
    z2 = m.get_latent_representation(noisy)
    np.testing.assert_allclose(z2[b1], z[b1], atol=1e-5)
    assert np.abs(z2[b0[:5]] - z[b0[:5]]).max() > 1e-3
    torch.manual_seed(0)
    err2 = m.get_reconstruction_error(noisy, indices=b1)["reconstruction_loss"]
    assert np.isfinite(err) and err2 == pytest.approx(err, rel=1e-5)
    # the gene shares are fitted among the cells that measure each gene
    frac = m.module.ref_gene_frac.numpy()
    assert np.isclose(frac.sum(), 1.0, atol=1e-5) and (frac[20:] > 0).all()


def test_panels_keyed_by_another_column_are_refused():
    a, _ = _panel_adata()
    a.uns[BATCH_GENE_MASKS]["batch_key"] = "donor"
    sfa.model.SCFM.setup_anndata(a, batch_key="batch")
    with pytest.raises(sfa.errors.SCFMInputError, match="batch_key='donor'"):
        sfa.model.SCFM(a, **TINY)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    import scvi

    scvi.settings.seed = 0
    folder = tmp_path_factory.mktemp("pretrain")
    paths, data = write_panels(folder)
    out = folder / "run"
    model = sfa.model.pretrain(paths, out, **RUN)
    return model, paths, data, out


def test_pretrain_writes_a_model_with_each_files_panel_and_card(pretrained):
    model, paths, data, out = pretrained
    assert model.adata.isbacked and model.adata.n_obs == 75
    assert model.trained_stages_ == ["vae", "prior"]
    mask = model.module.batch_gene_mask
    assert mask.sum(1).tolist() == [30, 30, 20]  # files a, b, c in batch order
    card = (out / "model" / "README.md").read_text()
    for p, (name, a) in zip(paths, data.items()):
        sha = sfa.data.file_sha256(p)
        assert f"| {name} (`{p.resolve()}`) | {a.n_obs} | {a.n_vars} | `{sha[:16]}` |" in card
    assert "`obs['dataset']` (a, b, c)" in card and "- vae: " in card
    nll = model.card_["evaluation"]["validation_reconstruction_nll"]
    assert nll > 0 and f"| validation_reconstruction_nll | {nll:.4g} |" in card
    run = json.loads((out / "run.json").read_text())
    assert run["files"] == [str(p.resolve()) for p in paths]
    loaded = sfa.model.SCFM.load(out / "model")
    assert torch.equal(loaded.module.batch_gene_mask, mask)
    assert loaded.batch_gene_masks_ == model.batch_gene_masks_
    z = model.get_latent_representation()
    assert z.shape[0] == 75 and np.isfinite(z).all()


def test_pretrain_resumes_and_refuses_a_changed_or_used_folder(pretrained):
    model, paths, _, out = pretrained
    z = model.get_latent_representation()
    again = sfa.model.pretrain(paths, out, resume=True, **RUN)
    np.testing.assert_allclose(again.get_latent_representation(), z, atol=1e-5)
    with pytest.raises(ValueError, match=r"differ: \['max_epochs'\]"):
        sfa.model.pretrain(paths, out, resume=True, **{**RUN, "max_epochs": 3})
    with pytest.raises(FileExistsError, match="resume=True"):
        sfa.model.pretrain(paths, out, max_epochs=2)
    with pytest.raises(FileNotFoundError, match="Nothing to resume"):
        sfa.model.pretrain(paths, out.parent / "fresh", resume=True)


def test_an_interrupted_pretrain_resumes_to_the_uninterrupted_model(pretrained, tmp_path):
    """Killed in the last epoch (the first checkpointed, no model saved): ``resume=True`` with
    the same arguments continues from the checkpoint to the model of the run that was never
    interrupted, whatever the seed at resumption."""
    import scvi

    from conftest import Crash, CrashAfter

    model, paths, _, _ = pretrained
    out = tmp_path / "run"
    scvi.settings.seed = 0
    crash = {**RUN, "train_kwargs": {**RUN["train_kwargs"], "callbacks": [CrashAfter(1)]}}
    with pytest.raises(Crash):
        sfa.model.pretrain(paths, out, **crash)
    assert not (out / "model").exists() and any((out / "checkpoints").rglob("*.ckpt"))
    scvi.settings.seed = 123  # the checkpoint decides, not the seed
    resumed = sfa.model.pretrain(paths, out, resume=True, **RUN)
    np.testing.assert_allclose(
        resumed.get_latent_representation(), model.get_latent_representation(), atol=1e-5
    )
    assert (out / "model" / "README.md").exists()


def test_a_query_with_60_percent_of_the_genes_maps_onto_the_reference(pretrained):
    model, *_ = pretrained
    q = make_adata(n_cells=40, seed=7)[:, [f"gene{j}" for j in range(24)]].copy()
    q.obs["dataset"] = "query"
    q.obs = q.obs[["dataset", "cell_type"]]
    query = sfa.model.SCFM.load_query_data(q, model, verbose=False)
    assert "24 of 40" in str(query.gene_overlap_)
    m = query.module
    assert int(m.gene_mask.sum()) == 24 and m.n_batch == 4
    assert m.batch_gene_mask.shape == (4, 40) and m.batch_gene_mask[3].all()
    query.train(max_epochs=2, stage="vae", **FAST)
    z = query.get_latent_representation()
    assert z.shape[0] == 40 and np.isfinite(z).all()
    # the genes the query lacks do not matter
    q2 = query.adata.copy()
    q2.X = sparse.csr_matrix(q2.X.toarray() + np.where(np.arange(40) >= 24, 7.0, 0.0))
    np.testing.assert_allclose(query.get_latent_representation(q2), z, atol=1e-5)


def test_the_command_line_pretrains(tmp_path):
    from scfm_adapt.cli import main

    paths, _ = write_panels(tmp_path)
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(f"gene{j}" for j in range(0, 40, 2)))
    code = main(
        [
            "pretrain",
            *map(str, paths),
            "--out",
            str(tmp_path / "run"),
            "--genes",
            str(genes),
            "--stage",
            "vae",
            "--max-epochs",
            "1",
            "--batch-size",
            "32",
            "--model-kwargs",
            json.dumps(TINY),
            "--no-progress",
        ]
    )
    assert code == 0
    loaded = sfa.model.SCFM.load(tmp_path / "run" / "model")
    assert loaded.var_names_ == [f"gene{j}" for j in range(0, 40, 2)]
    assert loaded.module.batch_gene_mask.sum(1).tolist() == [15, 15, 20]


def test_gene_shares_are_unbiased_when_a_batch_measures_half_the_genes():
    """Batch b1 measures genes 0-19 only: each gene's share of all counts is estimated
    from the full libraries of the batches measuring it, so the shares of genes 0-19 are
    not inflated by b1's smaller (observed) libraries."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(40, 5.0))
    x = rng.poisson(4000 * p, (400, 40)).astype(np.float32)
    batch = np.repeat(["b0", "b1"], 200)
    x[200:, 20:] = 0
    a = ad.AnnData(sparse.csr_matrix(x), obs=pd.DataFrame({"batch": batch}))
    a.obs_names = [f"c{i}" for i in range(400)]
    a.var_names = [f"gene{j}" for j in range(40)]
    a.uns[BATCH_GENE_MASKS] = {"batch_key": "batch", "observed": {"b1": np.arange(40) < 20}}
    sfa.model.SCFM.setup_anndata(a, batch_key="batch")
    m = sfa.model.SCFM(a, **TINY)
    m._fit_gene_frac()
    frac = m.module.ref_gene_frac.numpy()
    np.testing.assert_allclose(frac, p, rtol=0.05)


def test_decoding_a_fixed_library_is_the_same_for_every_panel():
    """Only an observed library is rescaled by the cell's panel; a fixed (or sampled)
    library covers every gene whatever the batch."""
    a, _ = _panel_adata()
    sfa.model.SCFM.setup_anndata(a, batch_key="batch")
    m = sfa.model.SCFM(a, **TINY).module
    z = torch.randn(2, m.n_tokens, m.token_dim)
    conds = {"batch": torch.tensor([0, 1])}
    lib = torch.full((2, 1), 1000.0)
    fixed = m.decode(z, lib, conds).mean
    np.testing.assert_allclose(fixed.sum(-1).detach().numpy(), [1000.0, 1000.0], rtol=1e-4)
    obs = m.cell_gene_mask(conds["batch"])
    own = m.decode(z, lib, conds, observed=obs).mean
    covered = (own * obs).sum(-1).detach().numpy()
    np.testing.assert_allclose(covered, [1000.0, 1000.0], rtol=1e-4)
    assert float(own[1].sum()) > 1000.0 * 1.01  # b1's library covers only its genes


def test_a_query_combined_from_files_keeps_its_own_panels(pretrained, tmp_path):
    """A query that is itself data combined from files with different genes: its new
    batches get their own panels (carried through the alignment to the reference genes)."""
    model, *_ = pretrained
    paths, _ = write_panels(tmp_path, n_cells=(20, 20, 20))
    q = sfa.data.combine_h5ad(
        paths[:2], tmp_path / "q.h5ad", batch_labels=["q1", "q2"], progress=False
    ).to_memory()
    q.obs = q.obs[["dataset", "cell_type"]]
    query = sfa.model.SCFM.load_query_data(q, model, verbose=False)
    rows = query.module.batch_gene_mask
    assert rows.shape == (5, 40)  # a, b, c, then q1, q2
    assert rows[3].tolist() == [True] * 30 + [False] * 10  # q1 measures genes 0-29
    assert rows[4].tolist() == [False] * 10 + [True] * 30  # q2 measures genes 10-39
    assert set(query.batch_gene_masks_) == {"a", "b", "c", "q1", "q2"}


def test_bad_pretraining_inputs_are_named(tmp_path, capsys):
    from scfm_adapt.cli import main

    paths, _ = write_panels(tmp_path)
    with pytest.raises(sfa.errors.SCFMInputError, match="measured by no file"):
        sfa.data.combine_h5ad(paths, tmp_path / "x.h5ad", genes=["gene10", "gene12", "nowhere"])
    with pytest.raises(SystemExit):
        main(["pretrain", str(paths[0]), "--out", str(tmp_path / "r"), "--model-kwargs", "{x"])
    assert "give an object such as" in capsys.readouterr().err


def test_transfer_labels_with_copy_leaves_the_query_alone(tmp_path):
    from conftest import make_adata as mk

    ref = mk(n_cells=120, seed=4)
    sfa.model.SCFM.setup_anndata(ref, batch_key="batch")
    model = sfa.model.SCFM(ref, **TINY)
    model.train(max_epochs=2, stage="vae", **FAST)
    sfa.model.CellAnnotator.setup_anndata(ref, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(ref, pretrained=model, strategy="linear_probe")
    ann.train(max_epochs=2, **FAST)
    q = mk(n_cells=30, seed=5)
    out = sfa.tl.transfer_labels(q, ann, copy=True)
    assert "scfm_label" in out.obs and "scfm_label" not in q.obs and "scfm_label" not in q.uns


def test_several_devices_name_the_ddp_strategy_scvi_tools_samples_by():
    from scfm_adapt.model._scfm import _data_parallel_strategy

    assert _data_parallel_strategy("cpu", 2) == "ddp"
    assert _data_parallel_strategy("cpu", "2") == "ddp"
    assert _data_parallel_strategy("auto", [0, 1]) == "ddp"
    assert _data_parallel_strategy("cpu", 1) is None
    assert _data_parallel_strategy("cpu", "auto") is None


@pytest.mark.slow
def test_pretrain_on_two_cpu_processes_with_ddp(tmp_path):
    """``scfm-adapt pretrain --devices 2``: Lightning starts a second process that runs the
    command again; it reuses the prepared folder, trains beside the first, and only the
    first evaluates, saves and reports."""
    import subprocess
    import sys

    paths, _ = write_panels(tmp_path, n_cells=(120, 80, 100))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "scfm_adapt.cli", "pretrain", *map(str, paths), "--out",
           str(out), "--max-epochs", "2", "--prior-steps", "4", "--batch-size", "32",
           "--accelerator", "cpu", "--devices", "2", "--no-progress",
           "--model-kwargs", json.dumps({"n_tokens": 4, "token_dim": 4})]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # the second process neither saves nor reports
    model = sfa.model.SCFM.load(out / "model")
    assert model.trained_stages_ == ["vae", "prior"] and (out / "model" / "README.md").exists()
    assert model.module.batch_gene_mask.sum(1).tolist() == [30, 30, 20]


def test_a_student_keeps_the_teachers_gene_panels(pretrained):
    """Distilling on cells whose file no longer records the panels (``uns`` dropped): the
    student still leaves each batch's unmeasured genes unobserved, as its teacher does."""
    model, _, _, _ = pretrained
    cells = model.adata.to_memory()
    cells.uns.pop(BATCH_GENE_MASKS, None)
    student = sfa.model.distill(
        model, cells, max_epochs=1, encoder_hidden=8, decoder_hidden=16, **FAST
    )
    assert student.batch_gene_masks_ == model.batch_gene_masks_
    assert torch.equal(student.module.batch_gene_mask, model.module.batch_gene_mask)

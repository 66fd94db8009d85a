"""The SCFM model on a tiny synthetic AnnData: the scvi-tools contract end to end."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scfm_adapt as sfa
from conftest import make_adata
from scfm_adapt.errors import (
    CheckpointError,
    GeneMismatchError,
    InvalidCountsError,
    UnknownCategoryError,
)


def test_train_both_stages_and_history(trained_in_memory):
    trained = trained_in_memory
    assert trained.trained_stages_ == ["vae", "prior"]
    assert set(trained.history) == {"vae", "prior"}
    for stage in ("vae", "prior"):
        h = trained.history[stage]
        assert len(h["elbo_train"]) == 3 and "elbo_validation" in h
    assert "diffusion_mse_train" in trained.history["prior"]
    text = repr(trained)
    assert "SCFM" in text and "trained stages: vae, prior" in text and "labels" in text


def test_latent_shapes(trained, adata):
    z = trained.get_latent_representation()  # the tokens joined (4 tokens x 4)
    tokens = trained.get_latent_representation(return_tokens=True)
    assert z.shape == (adata.n_obs, 16) and tokens.shape == (adata.n_obs, 4, 4)
    np.testing.assert_allclose(tokens.reshape(adata.n_obs, -1), z, rtol=1e-5, atol=1e-6)
    mean = trained.get_latent_representation(pooling="mean")
    np.testing.assert_allclose(tokens.mean(1), mean, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trained.get_latent_representation(give_mean=False), z)
    with pytest.raises(ValueError, match="pooling="):
        trained.get_latent_representation(pooling="max")


def test_normalized_expression_and_transform_batch(trained, adata):
    expr = trained.get_normalized_expression()
    assert isinstance(expr, pd.DataFrame) and expr.shape == adata.shape
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    lib = trained.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_allclose(lib.sum(1), np.asarray(adata.X.sum(1)).ravel(), rtol=1e-3)
    b1 = trained.get_normalized_expression(transform_batch="b1", return_numpy=True)
    assert not np.allclose(b1, expr.values)
    sub = trained.get_normalized_expression(indices=[0, 5], gene_list=["gene3", "gene1"])
    assert list(sub.columns) == ["gene3", "gene1"] and list(sub.index) == ["cell0", "cell5"]
    with pytest.raises(UnknownCategoryError, match="b7"):
        trained.get_normalized_expression(transform_batch="b7")


def test_posterior_predictive_and_reconstruction(trained, adata):
    x = trained.posterior_predictive_sample(n_samples=2)
    assert x.shape == (*adata.shape, 2) and np.array_equal(x, np.round(x)) and (x >= 0).all()
    nll = trained.get_reconstruction_error(indices=np.arange(10))["reconstruction_loss"]
    assert np.isfinite(nll) and nll > 0


def test_save_load_round_trip_gives_identical_latent(trained_in_memory, adata, tmp_path):
    trained = trained_in_memory
    path = trained.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    loaded = sfa.model.SCFM.load(path, adata=adata)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )
    assert loaded.trained_stages_ == ["vae", "prior"]
    assert list(loaded.history["vae"]["elbo_train"].values.ravel()) == pytest.approx(
        list(trained.history["vae"]["elbo_train"].values.ravel())
    )
    # without AnnData, then embedding a fresh copy of the data
    bare = sfa.model.SCFM.load(path)
    np.testing.assert_array_equal(
        bare.get_latent_representation(adata.copy()), trained.get_latent_representation()
    )


def test_save_refuses_to_overwrite_and_is_atomic(trained, adata, tmp_path, monkeypatch):
    from scfm_adapt.model.base import _checkpoint as _io

    path = trained.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(path)
    before = (path / "model.safetensors").read_bytes()
    calls = []
    real = _io._fsync_write

    def failing_write(p, data):
        calls.append(p)
        if len(calls) == 2:  # after the weights, while writing the config
            raise OSError("disk full (simulated)")
        return real(p, data)

    monkeypatch.setattr(_io, "_fsync_write", failing_write)
    with torch.no_grad():  # new weights: an in-place write would change the file
        trained.module.px_r.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        trained.save(path, overwrite=True)
    monkeypatch.setattr(_io, "_fsync_write", real)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind
    old = sfa.model.SCFM.load(path, adata=adata)
    assert torch.allclose(old.module.px_r + 1.0, trained.module.px_r)


def test_damaged_checkpoints_are_refused(trained, adata, tmp_path):
    path = trained.save(tmp_path / "m")
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        sfa.model.SCFM.load(path, adata=adata)
    w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="SHA-256"):
        sfa.model.SCFM.load(path, adata=adata)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "model.pt").write_bytes(b"\x80\x04crashes_if_unpickled")
    with pytest.raises(CheckpointError, match="never loaded"):
        sfa.model.SCFM.load(evil)


def test_load_checks_genes_and_categories(trained, adata, tmp_path):
    path = trained.save(tmp_path / "m")
    with pytest.raises(GeneMismatchError, match="another order"):
        sfa.model.SCFM.load(path, adata=adata[:, adata.var_names[::-1]].copy())
    with pytest.raises(GeneMismatchError, match="missing"):
        sfa.model.SCFM.load(path, adata=adata[:, :30].copy())
    new = adata.copy()
    new.obs["batch"] = pd.Categorical(["b9"] * new.n_obs)
    with pytest.raises(UnknownCategoryError, match="b9"):
        sfa.model.SCFM.load(path, adata=new)
    with pytest.raises(UnknownCategoryError, match="b9"):
        trained.get_latent_representation(new)


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda X: X * 0.5, InvalidCountsError, "non-integer"),
        (lambda X: X - 3, InvalidCountsError, "negative"),
        (lambda X: np.where(X > 5, np.nan, X), InvalidCountsError, "NaN"),
        (lambda X: np.where(X > 5, np.inf, X), InvalidCountsError, "NaN or infinite"),
    ],
)
def test_bad_counts_fail_clearly(mutate, error, match):
    a = make_adata()
    a.X = mutate(a.X.toarray())
    with pytest.raises(error, match=match):
        sfa.model.SCFM.setup_anndata(a)
    b = make_adata()
    b.layers["counts"] = sparse.csr_matrix(mutate(b.X.toarray()))
    with pytest.raises(error, match=r"layers\['counts'\]"):
        sfa.model.SCFM.setup_anndata(b, layer="counts")


def test_other_bad_input_fails_clearly(adata, trained):
    with pytest.raises(KeyError, match="donor"):
        sfa.model.SCFM.setup_anndata(adata, batch_key="donor")
    with pytest.raises(KeyError, match="Layer 'counts'"):
        sfa.model.SCFM.setup_anndata(adata, layer="counts")
    with pytest.raises(InvalidCountsError, match="empty"):
        sfa.model.SCFM.setup_anndata(adata[:0].copy())
    floats = adata.copy()
    floats.X = floats.X * 0.5
    with pytest.raises(InvalidCountsError, match="non-integer"):
        trained.get_latent_representation(floats)
    with pytest.raises(ValueError, match="gene_likelihood"):
        sfa.model.SCFM(adata, gene_likelihood="gaussian")


@pytest.mark.parametrize(
    "kwargs",
    [{"gene_likelihood": "zinb", "dispersion": "gene-batch"}, {"gene_likelihood": "poisson"}],
)
def test_likelihood_variants_train(adata, tiny_kwargs, kwargs):
    sfa.model.SCFM.setup_anndata(
        adata,
        batch_key="batch",
        categorical_covariate_keys=["donor_sex"],
        continuous_covariate_keys=["age"],
    )
    model = sfa.model.SCFM(adata, **kwargs, **tiny_kwargs)
    assert set(model.module.dit.condition_names) == {"batch", "cat_cov_0", "continuous"}
    model.train(max_epochs=2, enable_progress_bar=False, batch_size=32)
    assert np.isfinite(model.get_latent_representation()).all()


def test_vae_loss_falls_during_training(adata, tiny_kwargs):
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch")
    model = sfa.model.SCFM(adata, **tiny_kwargs)
    model.train(
        max_epochs=25, stage="vae", enable_progress_bar=False, batch_size=32, early_stopping=False
    )
    elbo = model.history["vae"]["elbo_train"].values.ravel()
    assert elbo[-3:].mean() < 0.95 * elbo[:3].mean()
    with pytest.raises(RuntimeError, match="VAE first"):
        sfa.model.SCFM(adata, **tiny_kwargs).train(stage="prior")


def test_tl_embed_and_normalize_write_slots(trained, adata):
    X_before = adata.X.copy()
    sfa.tl.embed(adata, trained, tokens=True)
    assert adata.obsm["X_scfm"].shape == (adata.n_obs, 16)  # the tokens joined
    assert adata.obsm["X_scfm_tokens"].shape == (adata.n_obs, 16)
    np.testing.assert_array_equal(adata.obsm["X_scfm"], adata.obsm["X_scfm_tokens"])
    adata.obsm["X_scfm"][:] = 0  # e.g. a scaling in place: the tokens' slot is untouched
    assert np.abs(adata.obsm["X_scfm_tokens"]).sum() > 0
    sfa.tl.embed(adata, trained, key_added="X_mean", pooling="mean")
    assert adata.obsm["X_mean"].shape == (adata.n_obs, 4)
    assert adata.uns["X_mean"]["params"]["pooling"] == "mean"
    assert adata.uns["X_scfm"]["params"]["tokens"] is True
    sfa.tl.normalize_expression(adata, trained)
    assert adata.layers["scfm_normalized"].shape == adata.shape
    np.testing.assert_allclose(adata.layers["scfm_normalized"].sum(1), 1e4, rtol=1e-3)
    out = sfa.tl.embed(adata, trained, key_added="emb2", copy=True)
    assert "emb2" in out.obsm and "emb2" not in adata.obsm
    assert (adata.X != X_before).nnz == 0


def test_scanpy_picks_up_the_embedding(trained, adata):
    import scanpy as sc

    sfa.tl.embed(adata, trained)
    sc.pp.neighbors(adata, use_rep="X_scfm", n_neighbors=10)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2)
    assert adata.obs["leiden"].nunique() >= 1 and "connectivities" in adata.obsp


def test_import_is_light():
    code = (
        "import sys, scfm_adapt; "
        "heavy = [m for m in ('torch', 'scvi', 'scanpy', 'lightning') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_imports_flow_one_way():
    """nn → diffusion → module → train → model → tl: no layer imports a later one."""
    import ast
    from pathlib import Path

    order = ["nn", "diffusion", "module", "train", "model", "tl"]
    root = Path(sfa.__file__).parent
    for i, layer in enumerate(order):
        for f in (root / layer).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
                    top = node.module.split(".")[0]
                    if top in order:
                        assert order.index(top) < i, f"{f.name} ({layer}) imports {top}"


def test_each_stage_trains_in_train_mode_with_the_other_half_frozen(adata, tiny_kwargs):
    """The prior must train in train mode (CFG condition dropout), the frozen VAE in eval."""
    from lightning.pytorch.callbacks import Callback

    seen = []

    class Modes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            m = pl_module.module
            seen.append((m.stage, m.training, m.encoder.training, m.dit.training))

    sfa.model.SCFM.setup_anndata(adata, batch_key="batch")
    model = sfa.model.SCFM(adata, **tiny_kwargs)
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False, callbacks=[Modes()])
    assert ("vae", True, True, False) in seen and ("prior", True, False, True) in seen
    assert {s[0] for s in seen} == {"vae", "prior"} and len(set(seen)) == 2


def test_latent_statistics_of_a_trained_model(trained, adata):
    stats = trained.get_latent_statistics(labels_key="cell_type", batch_key="batch")
    assert list(stats.index) == [f"token{i}" for i in range(4)] + ["all"]
    assert ((stats["signal_share"] >= 0) & (stats["signal_share"] <= 1)).all()
    assert stats.loc["all", "active_dims"] <= 16 and (stats["kl"] > 0).all()
    assert {"label_share", "batch_share"} <= set(stats.columns)
    with pytest.raises(KeyError, match="not a column"):
        trained.get_latent_statistics(labels_key="nope")


def test_the_prior_runs_its_budget_without_early_stopping(adata, tiny_kwargs):
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = sfa.model.SCFM(adata, **tiny_kwargs)
    fit = {"batch_size": 32, "enable_progress_bar": False, "early_stopping_patience": 1}
    model.train(max_epochs=1, stage="vae", **fit)
    # no epochs given: a budget of optimiser steps (86 training cells: 3 batches an epoch)
    model.train(stage="prior", prior_steps=10, **fit)
    assert len(model.history["prior"]["elbo_train"]) == 4  # ceil(10 / 3), never stopped early
    assert model.trainer.global_step == 10  # the budget is the trainer's max_steps
    with pytest.raises(ValueError, match="prior_steps"):
        model.train(stage="prior", prior_steps=0, **fit)
    model.train(max_epochs=6, stage="prior", **fit)  # epochs given: the prior follows them
    assert len(model.history["prior"]["elbo_train"]) == 6


def test_the_kl_weight_warms_up_over_a_third_of_the_vae_epochs(adata, tiny_kwargs):
    sfa.model.SCFM.setup_anndata(adata)
    model = sfa.model.SCFM(adata, **tiny_kwargs)
    # warm-up over 6 // 3 = 2 epochs
    model.train(
        max_epochs=6, stage="vae", batch_size=32, enable_progress_bar=False, log_every_n_steps=1
    )
    weights = model.history["vae"]["kl_weight"]["kl_weight"].to_numpy(dtype=float)
    # one value an epoch in the history: 0 and 1/2 during the warm-up, then full weight
    np.testing.assert_allclose(weights, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("target", ["sample", "mean"])
def test_the_library_model_fits_the_tokens_the_prior_learns(adata, tiny_kwargs, target):
    # The DiT learns (and generates) posterior samples, or means with prior_target="mean";
    # the library model that completes generated cells must be fitted on the same kind.
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch")
    model = sfa.model.SCFM(adata, prior_target=target, **tiny_kwargs)
    module = model.module.train()
    tensors = next(iter(model._batches(adata, np.arange(16), 16)))
    inference = module.inference(**module._get_inference_input(tensors))
    generative = module.generative(**module._get_generative_input(tensors, inference))
    seen, fit = [], module.library_nll
    module.library_nll = lambda z, library, conditions: (
        seen.append(z) or fit(z, library, conditions)
    )
    module.loss(tensors, inference, generative)
    want = inference["qz"].loc if target == "mean" else inference["z"]
    torch.testing.assert_close(seen[0], want.detach())
    assert not torch.equal(inference["qz"].loc, inference["z"])  # the two kinds differ

"""Generation: ``SCFM.generate``, guidance, DDIM inversion and counterfactuals,
``sfa.tl.augment`` and ``sfa.metrics``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scfm_adapt as sfa
from conftest import TINY, make_adata, n_threads
from scfm_adapt.errors import UnknownCategoryError

FIT = {"enable_progress_bar": False, "early_stopping": False, "batch_size": 64}


@pytest.fixture(scope="module")
def gen_model():
    """A tiny model trained long enough for its prior to learn the cell types."""
    import scvi

    scvi.settings.seed = 0
    torch.set_num_threads(n_threads())
    adata = make_adata(480, 40, seed=1)
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = sfa.model.SCFM(adata, **TINY)
    model.train(max_epochs=100, max_epochs_prior=100, lr_prior=2e-3, **FIT)
    return model


def _fractions(x) -> np.ndarray:
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    return x / x.sum(1, keepdims=True)


# --------------------------------------------------------------------------- generate
def test_generate_returns_counts_with_conditions(gen_model):
    out = gen_model.generate({"cell_type": "type1"}, n_samples=30, n_steps=10)
    assert out.shape == (30, 40)
    assert list(out.var_names) == gen_model.var_names_
    assert out.obs_names.is_unique
    assert sparse.issparse(out.X) and out.X.dtype == np.float32
    x = out.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x)) and x.sum() > 0
    assert out.layers["scfm_expected"].shape == (30, 40)
    assert (out.obs["cell_type"] == "type1").all()
    # The batch was not given: it is drawn from type1's training cells.
    assert set(out.obs["batch"]) <= {"b0", "b1"}
    assert (out.obs["scfm_library"] > 0).all()
    assert out.uns["scfm_generate"]["params"]["n_steps"] == 10
    # Per-cell conditions from a DataFrame keep their rows.
    frame = pd.DataFrame({"cell_type": ["type0", "type2", "type2"], "batch": ["b1", "b0", "b1"]})
    out = gen_model.generate(frame, n_steps=5)
    assert list(out.obs["cell_type"]) == list(frame["cell_type"])
    assert list(out.obs["batch"]) == list(frame["batch"])


def test_generate_is_reproducible_under_a_seed(gen_model):
    a = gen_model.generate({"cell_type": "type0"}, n_samples=20, n_steps=10, seed=3)
    b = gen_model.generate({"cell_type": "type0"}, n_samples=20, n_steps=10, seed=3)
    c = gen_model.generate({"cell_type": "type0"}, n_samples=20, n_steps=10, seed=4)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.layers["scfm_expected"], b.layers["scfm_expected"])
    assert (a.X != c.X).nnz > 0
    d = gen_model.generate(
        {"cell_type": "type0"}, n_samples=20, n_steps=10, seed=3, sampler="ddpm", batch_size=7
    )
    e = gen_model.generate(
        {"cell_type": "type0"}, n_samples=20, n_steps=10, seed=3, sampler="ddpm", batch_size=7
    )
    assert (d.X != e.X).nnz == 0


def test_generated_cells_follow_their_condition(gen_model):
    """Cells generated for a type resemble that type's real cells more than another's,
    and guidance > 0 moves the conditional mean towards the type's mean (vs guidance 0)."""
    real = gen_model.adata
    means = {
        t: _fractions(real.X[(real.obs["cell_type"] == t).to_numpy()]).mean(0)
        for t in ("type0", "type1", "type2")
    }
    for t in means:
        gen = gen_model.generate({"cell_type": t}, n_samples=150, n_steps=20, seed=0)
        m = _fractions(gen.layers["scfm_expected"]).mean(0)
        dist = {u: np.abs(m - mu).sum() for u, mu in means.items()}
        assert min(dist, key=dist.get) == t, dist
    t = "type2"
    dists = {}
    for g in (0.0, 2.0):
        gen = gen_model.generate({"cell_type": t}, n_samples=150, n_steps=20, guidance_scale=g)
        dists[g] = np.abs(_fractions(gen.layers["scfm_expected"]).mean(0) - means[t]).sum()
    assert dists[2.0] < dists[0.0], dists


def test_per_covariate_guidance_combines_the_passes(gen_model):
    module = gen_model.module
    n = 6
    conds = {"batch": torch.tensor([0, 1] * 3), "labels": torch.tensor([0, 1, 2] * 2)}
    x = torch.randn(n, module.n_tokens, module.token_dim)
    t = torch.full((n,), 30)
    net = module.dit_ema
    with torch.no_grad():
        full = net(x, t, conds)
        no_labels = net(x, t, {"batch": conds["batch"]})
        no_batch = net(x, t, {"labels": conds["labels"]})
        null = net(x, t, {})
        per = module.guided_denoiser(conds, {"labels": 2.0, "batch": 0.0})(x, t)
        joint = module.guided_denoiser(conds, 3.0)(x, t)
        plain = module.guided_denoiser(conds, 1.0)(x, t)
    torch.testing.assert_close(per, full + (full - no_labels) - (full - no_batch))
    torch.testing.assert_close(joint, null + 3.0 * (full - null))
    torch.testing.assert_close(plain, full)
    with pytest.raises(KeyError, match="unknown conditions"):
        module.guided_denoiser(conds, {"donor": 2.0})
    # The public name of a covariate is its obs key.
    out = gen_model.generate(
        {"cell_type": "type0"}, n_samples=4, n_steps=5, guidance_scale={"cell_type": 2.0}
    )
    assert out.n_obs == 4


def test_generate_errors_are_clear(gen_model, adata, tiny_kwargs):
    with pytest.raises(UnknownCategoryError, match="type9"):
        gen_model.generate({"cell_type": "type9"}, n_samples=3)
    with pytest.raises(KeyError, match="not conditions of the model"):
        gen_model.generate({"tissue": "blood"}, n_samples=3)
    with pytest.raises(ValueError, match="n_samples"):
        gen_model.generate({"cell_type": "type0"})
    with pytest.raises(KeyError, match="not a condition"):
        gen_model.generate({"cell_type": "type0"}, n_samples=3, guidance_scale={"tissue": 2})
    with pytest.raises(ValueError, match="library_size"):
        gen_model.generate({"cell_type": "type0"}, n_samples=3, library_size=[1.0, 2.0])
    with pytest.raises(ValueError, match="Nothing to generate"):
        gen_model.generate(pd.DataFrame({"cell_type": []}))
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    vae_only = sfa.model.SCFM(adata, **tiny_kwargs)
    vae_only.train(max_epochs=1, stage="vae", **FIT)
    with pytest.raises(RuntimeError, match="prior"):
        vae_only.generate({"cell_type": "type0"}, n_samples=3)
    with pytest.raises(RuntimeError, match="prior"):
        vae_only.counterfactual(adata, {"batch": "b1"})


def test_given_library_sizes_set_the_expected_totals(gen_model):
    out = gen_model.generate({"cell_type": "type1"}, n_samples=5, n_steps=5, library_size=500.0)
    np.testing.assert_allclose(out.layers["scfm_expected"].sum(1), 500.0, rtol=1e-4)
    np.testing.assert_allclose(out.obs["scfm_library"], 500.0)


def test_library_model_learns(gen_model):
    nll = gen_model.history["vae"]["library_nll_train"].to_numpy().ravel()
    assert nll[-1] < nll[0]
    # Generated library sizes sit in the range of the real ones.
    adata = gen_model.adata
    for t in ("type0", "type1"):
        real = np.asarray(adata.X[(adata.obs["cell_type"] == t).to_numpy()].sum(1)).ravel()
        gen = gen_model.generate({"cell_type": t}, n_samples=200, n_steps=10)
        ratio = np.median(gen.obs["scfm_library"]) / np.median(real)
        assert 0.67 < ratio < 1.5, (t, ratio)


def test_generate_survives_save_and_load(gen_model, tmp_path):
    gen_model.save(tmp_path / "m")
    loaded = sfa.model.SCFM.load(tmp_path / "m", adata=gen_model.adata)
    kw = {"n_samples": 10, "n_steps": 5, "seed": 2}
    a = gen_model.generate({"cell_type": "type1"}, **kw)
    b = loaded.generate({"cell_type": "type1"}, **kw)
    np.testing.assert_allclose(a.layers["scfm_expected"], b.layers["scfm_expected"], rtol=1e-5)
    # Without the training data attached, a decoder covariate must be given.
    bare = sfa.model.SCFM.load(tmp_path / "m")
    with pytest.raises(ValueError, match="needed to decode"):
        bare.generate({"cell_type": "type1"}, n_samples=3)
    assert bare.generate({"cell_type": "type1", "batch": "b0"}, n_samples=3, n_steps=5).n_obs == 3


# --------------------------------------------------------------------------- counterfactuals
def test_inversion_then_regeneration_under_the_same_condition_reconstructs(gen_model):
    module = gen_model.module
    tensors = next(gen_model._batches(gen_model.adata, np.arange(64), 64))
    with torch.inference_mode():
        z0 = module.inference(**module._get_inference_input(tensors))["qz"].loc
        conds = module.conditions(tensors)
        x_T = module.invert_tokens(z0, conds, n_steps=50, strength=0.9)
        z1 = module.sample_tokens(64, conds, 1.0, n_steps=50, x_T=x_T, strength=0.9)
        other = {**conds, "batch": 1 - conds["batch"]}
        z2 = module.sample_tokens(64, other, 1.0, n_steps=50, x_T=x_T, strength=0.9)
    rel = ((z1 - z0).norm() / z0.norm()).item()
    assert rel < 0.1, rel
    assert ((z2 - z0).norm() / z0.norm()).item() > rel  # another batch moves the tokens


def test_counterfactual_and_inversion_transfer(gen_model):
    adata = gen_model.adata
    idx = np.arange(12)
    cf = gen_model.counterfactual(adata, {"batch": "b1"}, indices=idx, n_steps=20)
    assert cf.shape == (12, 40)
    assert list(cf.obs_names) == list(adata.obs_names[idx])
    assert (cf.obs["batch"] == "b1").all()
    assert list(cf.obs["scfm_source_batch"].astype(str)) == list(adata.obs["batch"][idx])
    # The observed library is kept by default.
    np.testing.assert_allclose(
        cf.layers["scfm_expected"].sum(1), np.asarray(adata.X[idx].sum(1)).ravel(), rtol=1e-3
    )
    dec = gen_model.get_normalized_expression(adata, indices=idx, transform_batch="b1")
    inv = gen_model.get_normalized_expression(
        adata, indices=idx, transform_batch="b1", transfer="inversion", n_steps=20
    )
    assert inv.shape == dec.shape and not np.allclose(inv.to_numpy(), dec.to_numpy())
    np.testing.assert_allclose(inv.to_numpy().sum(1), 1.0, rtol=1e-4)
    with pytest.raises(UnknownCategoryError):
        gen_model.counterfactual(adata, {"batch": "b7"}, indices=idx)
    with pytest.raises(ValueError, match="target is empty"):
        gen_model.counterfactual(adata, {}, indices=idx)


# --------------------------------------------------------------------------- augment
def test_augment_tops_up_rare_groups(gen_model):
    adata = gen_model.adata
    keep = np.r_[
        np.flatnonzero(adata.obs["cell_type"] != "type2"),
        np.flatnonzero(adata.obs["cell_type"] == "type2")[:5],
    ]
    small = adata[keep].copy()
    small.obsm["X_dummy"] = np.ones((small.n_obs, 3), dtype=np.float32)
    n_before = small.obs["cell_type"].value_counts()
    out = sfa.tl.augment(small, gen_model, groupby="cell_type", min_cells=40, n_steps=5)
    after = out.obs["cell_type"].value_counts()
    assert after["type2"] == 40
    assert after["type0"] == n_before["type0"] and after["type1"] == n_before["type1"]
    assert out.obs["scfm_generated"].sum() == 35
    assert not out.obs["scfm_generated"][: small.n_obs].any()
    assert (out.obs.loc[out.obs["scfm_generated"], "cell_type"] == "type2").all()
    assert np.isnan(out.obsm["X_dummy"][small.n_obs :]).all()
    x_new = out.X[small.n_obs :].toarray()
    assert np.array_equal(x_new, np.round(x_new))
    assert out.uns["scfm_augment"]["params"]["added"] == {"type2": 35}
    with pytest.raises(ValueError, match="not a categorical condition"):
        sfa.tl.augment(small, gen_model, groupby="donor_sex", min_cells=10)
    same = sfa.tl.augment(small, gen_model, groupby="cell_type", min_cells=3)
    assert same.n_obs == small.n_obs

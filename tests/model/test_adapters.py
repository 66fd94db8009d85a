"""Adaptation toolkit: strategies, exact no-op at init, trainability, named adapters,
merging, adapter checkpoints, gene alignment and query mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scfm_adapt as sfa
from scfm_adapt.errors import AdapterMismatchError, TooFewGenesError

STRATEGIES = ["linear_probe", "lora", "adapter", "partial", "full"]
FAST = {"enable_progress_bar": False, "early_stopping": False, "batch_size": 32}


def outputs(module, x):
    """Everything a model computes: posterior, decoded means, DiT and EMA-DiT outputs."""
    module.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        inf = module.inference(x, torch.zeros(x.shape[0], 1))
        cond = {"batch": torch.zeros(x.shape[0], dtype=torch.long)}
        px = module.decode(inf["qz"].loc, inf["library"], cond)
        x_t = torch.randn(inf["qz"].loc.shape, generator=g)
        t = torch.full((x.shape[0],), 500)
        return {
            "qz_loc": inf["qz"].loc.clone(),
            "qz_scale": inf["qz"].scale.clone(),
            "px_mean": px.mean.clone(),
            "dit": module.denoise(x_t, t, cond).clone(),
            "dit_ema": module.denoise(x_t, t, cond, use_ema=True).clone(),
        }


def assert_same(a, b):
    for k in a:
        assert torch.equal(a[k], b[k]), k


def counts(adata, n=16):
    return torch.as_tensor(adata.X[:n].toarray())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_identity_at_init(trained, adata, strategy):
    x = counts(adata)
    before = outputs(trained.module, x)
    report = trained.adapt(strategy, verbose=False)
    assert_same(before, outputs(trained.module, x))
    assert report["backbone"] > report["trainable"] >= 0 or strategy == "full"
    # the latent representation through the public API is bit-identical too
    trained.set_adapter(None)
    z0 = trained.get_latent_representation()
    trained.set_adapter("default")
    np.testing.assert_array_equal(z0, trained.get_latent_representation())


def _trainable(module, stage):
    module.set_stage(stage)
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_only_intended_parameters_train(trained):
    m = trained.module
    trained.adapt("lora", name="lo", verbose=False)
    vae = _trainable(m, "vae")
    assert vae and all("lora_" in n and ".lo." in n and n.startswith("encoder.") for n in vae)
    prior = _trainable(m, "prior")
    assert prior and all("lora_" in n and n.startswith("dit.blocks.") for n in prior)
    assert {n.rsplit(".", 3)[0] for n in vae} == {
        f"encoder.blocks.0.{t}" for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }

    trained.adapt("adapter", name="ad", verbose=False)
    vae = _trainable(m, "vae")
    assert vae and all(".adapters.ad." in n for n in vae)
    assert not any("lora_" in n for n in vae | _trainable(m, "prior"))

    trained.adapt("partial", name="pa", n_blocks=1, verbose=False)
    vae = _trainable(m, "vae")
    assert "encoder.head.weight" in vae and "encoder.norm.weight" in vae
    assert "encoder.gene_to_tokens.weight" not in vae
    assert not any("decoder." in n or "lora_" in n or ".adapters." in n for n in vae)
    prior = _trainable(m, "prior")
    assert any(n.startswith("dit.final.") for n in prior)
    assert not any(n.startswith(("dit.x_embed", "dit.t_embed", "dit_ema.")) for n in prior)

    trained.adapt("linear_probe", name="lp", verbose=False)
    assert _trainable(m, "vae") == set() == _trainable(m, "prior")
    assert trained.parameter_report()["trainable"] == 0
    with pytest.raises(ValueError, match="Nothing trains in stage 'vae'"):
        trained.train(max_epochs=1, stage="vae", **FAST)

    trained.adapt("full", name="fu", parts=("encoder",), verbose=False)
    vae = _trainable(m, "vae")
    assert "encoder.gene_to_tokens.weight" in vae and not any("decoder" in n for n in vae)
    assert _trainable(m, "prior") == set()


def test_lora_is_small_on_a_realistic_backbone():
    from scfm_adapt.module import SCFMModule

    m = SCFMModule(2000, n_batch=4, n_labels=8)  # default sizes, 2,000 genes
    m.add_adapter("default", "lora")
    report = m.parameter_report()
    assert 0 < report["fraction"] <= 0.05, report


def base_weights(module):
    """Pretrained weights by canonical name (peft renames ``x.weight`` to
    ``x.base_layer.weight``)."""
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in module.named_parameters()
        if "lora_" not in n and ".adapters." not in n
    }


@pytest.mark.parametrize("strategy", ["lora", "adapter"])
def test_adapter_training_leaves_base_untouched_and_round_trips(trained, adata, tmp_path, strategy):
    x = counts(adata)
    base_out = outputs(trained.module, x)
    base = base_weights(trained.module)
    trained.adapt(strategy, verbose=False)
    added = {n: p.detach().clone() for n, p in trained.module.named_parameters() if n not in base}
    trained.train(max_epochs=3, stage="both", lr=1e-2, lr_prior=1e-2, **FAST)
    after = base_weights(trained.module)
    assert base.keys() == after.keys()
    for n in base:
        assert torch.equal(base[n], after[n]), f"{n} moved"
    tuned = outputs(trained.module, x)
    assert not torch.equal(tuned["qz_loc"], base_out["qz_loc"])
    now = dict(trained.module.named_parameters())
    for part in ("encoder.", "dit.", "dit_ema."):  # the adapters of every part trained
        assert any(not torch.equal(v, now[n]) for n, v in added.items() if n.startswith(part))

    path = trained.save_adapter(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(path / "model.safetensors")
    assert saved and all(("lora_" in k) or (".adapters." in k) for k in saved)
    n_saved = sum(v.numel() for v in saved.values())
    assert n_saved < 0.5 * sum(v.numel() for v in base.values())

    trained.delete_adapter("default")
    assert_same(base_out, outputs(trained.module, x))
    assert trained.load_adapter(path) == "default"
    assert_same(tuned, outputs(trained.module, x))


def test_named_adapters_switch_and_partial_restores_base(trained, adata):
    x = counts(adata)
    base_out = outputs(trained.module, x)
    trained.adapt("partial", name="top", verbose=False)
    trained.train(max_epochs=2, stage="vae", lr=1e-2, **FAST)
    top = outputs(trained.module, x)
    assert not torch.equal(top["qz_loc"], base_out["qz_loc"])
    trained.adapt("lora", name="lo", verbose=False)  # parks "top", restores the base
    assert_same(base_out, outputs(trained.module, x))
    trained.train(max_epochs=2, stage="vae", lr=1e-2, **FAST)
    lo = outputs(trained.module, x)
    assert not torch.equal(lo["qz_loc"], top["qz_loc"])
    trained.set_adapter("top")
    assert_same(top, outputs(trained.module, x))
    trained.set_adapter("lo")
    assert_same(lo, outputs(trained.module, x))
    trained.set_adapter(None)
    assert_same(base_out, outputs(trained.module, x))
    assert trained.adapters == {"top": "partial", "lo": "lora"}
    with pytest.raises(KeyError, match="No adapter named 'nope'"):
        trained.set_adapter("nope")
    with pytest.raises(ValueError, match="exists already"):
        trained.adapt("lora", name="lo", verbose=False)


def test_merge_unmerge(trained, adata):
    x = counts(adata)
    trained.adapt("lora", verbose=False)
    trained.train(max_epochs=2, stage="vae", lr=1e-2, **FAST)
    tuned = outputs(trained.module, x)
    qkv = trained.module.encoder.blocks[0].attn.qkv.base_layer.weight
    w0 = qkv.detach().clone()
    trained.merge_adapter()
    assert trained.module.merged and not torch.equal(qkv, w0)
    merged = outputs(trained.module, x)
    for k in tuned:
        torch.testing.assert_close(merged[k], tuned[k], rtol=1e-4, atol=1e-5)
    trained.unmerge_adapter()
    assert not trained.module.merged
    torch.testing.assert_close(qkv.detach(), w0, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="No adapter is merged"):
        trained.unmerge_adapter()
    trained.adapt("adapter", name="bottle", verbose=False)
    with pytest.raises(ValueError, match="non-linear"):
        trained.merge_adapter()


def test_model_save_load_with_adapters(trained, adata, tmp_path):
    x = counts(adata)
    trained.adapt("partial", name="top", verbose=False)
    trained.train(max_epochs=1, stage="vae", lr=1e-2, **FAST)
    trained.adapt("lora", name="lo", verbose=False)
    trained.train(max_epochs=1, stage="vae", lr=1e-2, **FAST)
    trained.merge_adapter()
    out_lo = outputs(trained.module, x)
    trained.save(tmp_path / "m")
    loaded = sfa.model.SCFM.load(tmp_path / "m", adata=adata)
    assert loaded.active_adapter == "lo" and loaded.module.merged
    for k, v in outputs(loaded.module, x).items():
        torch.testing.assert_close(v, out_lo[k], rtol=1e-5, atol=1e-6)
    trained.set_adapter("top")
    loaded.set_adapter("top")
    assert_same(outputs(trained.module, x), outputs(loaded.module, x))
    trained.set_adapter(None)
    loaded.set_adapter(None)
    assert_same(outputs(trained.module, x), outputs(loaded.module, x))


def test_errors(trained, tmp_path, tiny_kwargs):
    with pytest.raises(ValueError, match="Unknown strategy 'prompt'"):
        trained.adapt("prompt", verbose=False)
    with pytest.raises(ValueError, match="parts="):
        trained.adapt("lora", parts=("head",), verbose=False)
    with pytest.raises(ValueError, match="match no linear layer"):
        trained.adapt("lora", target_modules=("nothing",), verbose=False)
    with pytest.raises(ValueError, match="No active adapter"):
        trained.merge_adapter()
    trained.adapt("lora", verbose=False)
    path = trained.save_adapter(tmp_path / "a")
    from conftest import make_adata

    ad2 = make_adata(n_genes=30)
    sfa.model.SCFM.setup_anndata(ad2, batch_key="batch")
    m2 = sfa.model.SCFM(ad2, **tiny_kwargs)
    with pytest.raises(AdapterMismatchError, match="n_genes"):
        m2.load_adapter(path)
    ad3 = make_adata()
    sfa.model.SCFM.setup_anndata(ad3, batch_key="batch")
    m3 = sfa.model.SCFM(ad3, **{**tiny_kwargs, "encoder_hidden": 8})
    with pytest.raises(AdapterMismatchError, match="encoder_hidden"):
        m3.load_adapter(path)
    with pytest.raises(sfa.errors.CheckpointError, match="not an adapter"):
        trained.save(tmp_path / "full")
        trained.load_adapter(tmp_path / "full")


# ---------------------------------------------------------------- gene alignment
def test_align_genes_permuted_missing_extra(adata):
    from scfm_adapt.data import align_genes

    ref = list(adata.var_names)
    rng = np.random.default_rng(0)
    keep = rng.permutation(len(ref))[:30]  # 10 missing, order shuffled
    q = adata[:, keep].copy()
    q.var_names = [ref[i] for i in keep]
    import anndata as ad
    import scipy.sparse as sp

    extra = ad.AnnData(sp.csr_matrix(np.ones((q.n_obs, 3), np.float32)), obs=q.obs)
    extra.var_names = ["X1", "X2", "X3"]
    q = ad.concat([q, extra], axis=1, merge="first")
    out = align_genes(q, ref)
    assert list(out.var_names) == ref
    obs = out.var["scfm_observed"].to_numpy()
    assert obs.sum() == 30 and set(np.flatnonzero(obs)) == set(keep)
    for i in keep:  # counts moved with their gene
        np.testing.assert_array_equal(out[:, ref[i]].X.toarray(), adata[:, ref[i]].X.toarray())
    assert out[:, ~obs].X.sum() == 0
    assert out.uns["scfm_gene_overlap"]["n_extra"] == 3
    with pytest.raises(TooFewGenesError, match="Only 30 of 40 reference genes"):
        align_genes(q, ref, min_overlap=0.9)


def test_query_mapping_new_batch_and_masked_genes(trained, adata):
    from conftest import make_adata

    q = make_adata(n_cells=64, seed=3)
    q.obs["batch"] = q.obs["batch"].cat.rename_categories({"b0": "new0", "b1": "new1"})
    q = q[:, [f"gene{j}" for j in range(5, 40)]].copy()  # 5 genes missing
    base = base_weights(trained.module)
    query = sfa.model.SCFM.load_query_data(q, trained, strategy="adapter", verbose=False)
    m = query.module
    assert m.n_batch == 4 and int(m.gene_mask.sum()) == 35
    assert list(query.adata.var_names) == trained.var_names_
    assert "35 of 40" in str(query.gene_overlap_)
    mask = m.trainable_mask("vae")
    on = {n for n, v in mask.items() if v}
    assert "decoder.cov_embed.0.extra" in on
    assert all(".adapters.query." in n or n.endswith(".extra") for n in on)
    query.train(max_epochs=5, stage="both", lr=1e-2, lr_prior=1e-2, **FAST)
    hist = query.history["vae"]["elbo_train"].to_numpy().ravel()
    assert hist[-1] < hist[0]
    ref_after, q_after = base_weights(trained.module), base_weights(m)
    for n, v in base.items():  # the reference is untouched, and so are the query's
        assert torch.equal(ref_after[n], v), n  # pretrained weights and rows
        assert torch.equal(q_after[n].cpu(), v), n
    z = query.get_latent_representation()
    assert z.shape == (64, 16) and np.isfinite(z).all()
    # masked genes are excluded from the likelihood: their counts do not matter
    x = torch.as_tensor(query.adata.X[:8].toarray())
    x2 = x.clone()
    x2[:, :5] = 50.0
    m.eval()
    batch = torch.full((8, 1), 2)
    tensors = {"X": x, "batch": batch, "labels": torch.zeros(8, 1)}
    m.set_stage("vae")
    torch.manual_seed(0)
    _, _, l1 = m(tensors)
    torch.manual_seed(0)
    _, _, l2 = m({**tensors, "X": x2})
    assert torch.equal(
        l1.reconstruction_loss["reconstruction_loss"], l2.reconstruction_loss["reconstruction_loss"]
    )

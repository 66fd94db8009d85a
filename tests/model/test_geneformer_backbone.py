"""A Geneformer-style BERT from a local folder as the SCFM encoder: adaptation strategies,
adapters that round-trip, annotation and perturbation on top, vocabulary errors.

The checkpoints are small random BERTs written in Geneformer's on-disk format
(:func:`~scfm_adapt.data.write_random_geneformer`); real weights cannot be downloaded here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scfm_adapt as sfa
from scfm_adapt.data import write_random_geneformer
from scfm_adapt.errors import GeneMismatchError

FAST = {"enable_progress_bar": False, "early_stopping": False, "batch_size": 32}
SIZES = {
    "n_tokens": 4,
    "token_dim": 4,
    "decoder_hidden": 32,
    "dit_hidden": 32,
    "dit_depth": 1,
    "dit_heads": 2,
    "n_diffusion_steps": 100,
}


def backbone_dir(tmp_path, n_known: int = 34, v2: bool = False):
    """A random Geneformer folder knowing genes 0..n_known-1 of make_adata, plus others."""
    genes = [f"gene{i}" for i in range(n_known)] + [f"OTHER{i}" for i in range(20)]
    return write_random_geneformer(tmp_path / "gf", genes, max_len=32, v2=v2)


@pytest.fixture(scope="module")
def gf_model(tmp_path_factory):
    from conftest import make_adata

    tmp = tmp_path_factory.mktemp("gf")
    path = backbone_dir(tmp)
    a = make_adata(n_cells=160, seed=3)
    sfa.model.SCFM.setup_anndata(a, batch_key="batch")
    m = sfa.model.SCFM(a, tokenizer="geneformer", backbone=path, **SIZES)
    before = {k: v.clone() for k, v in m.module.encoder.state_dict().items()}
    m.train(max_epochs=4, stage="vae", **FAST)
    return m, a, before, tmp


def _bert_keys(state):
    return [k for k in state if k.startswith(("embeddings.", "blocks."))]


def test_base_training_keeps_the_backbone_frozen(gf_model):
    m, _, before, _ = gf_model
    after = m.module.encoder.state_dict()
    bert = _bert_keys(before)
    assert bert and all(torch.equal(before[k], after[k]) for k in bert)
    assert not torch.equal(before["head.weight"], after["head.weight"])  # the read-out trains
    elbo = m.history["vae"]["elbo_train"].to_numpy().ravel()
    assert elbo[-1] < elbo[0]
    opts = m.module.hparams_["tokenizer_options"]
    assert opts["vocab_fraction"] == pytest.approx(34 / 40)
    assert opts["sha256"] and len(opts["gene_token_ids"]) == 40


@pytest.mark.parametrize("strategy", ["lora", "adapter", "partial", "full", "linear_probe"])
def test_strategies_start_as_no_ops_and_adapters_round_trip(gf_model, strategy, tmp_path):
    m, a, _, _ = gf_model
    m.set_adapter(None)
    z0 = m.get_latent_representation()
    name = f"t_{strategy}"
    m.adapt(strategy, name=name, parts=("encoder",), verbose=False)
    try:
        np.testing.assert_array_equal(m.get_latent_representation(), z0)  # identity at init
        rep = m.module.parameter_report("vae")
        bert_trainable = [
            n
            for n, on in m.module.trainable_mask("vae").items()
            if on and n.startswith(("encoder.embeddings.", "encoder.blocks."))
        ]
        if strategy == "linear_probe":
            assert rep["trainable"] == 0 and not bert_trainable
            return
        assert bert_trainable  # each strategy reaches into the BERT
        if strategy == "lora":
            assert all("lora_" in n for n in bert_trainable)
        if strategy == "adapter":
            assert all(".adapters." in n for n in bert_trainable)
        m.train(max_epochs=2, stage="vae", **FAST)
        z1 = m.get_latent_representation()
        assert not np.array_equal(z1, z0)
        saved = m.save_adapter(tmp_path / "adapter", name=name)
        back = sfa.model.SCFM.load(m.save(tmp_path / "base"), adata=a)
        back.set_adapter(None)
        back.delete_adapter(name)
        back.load_adapter(saved, name="again")
        np.testing.assert_allclose(back.get_latent_representation(), z1, rtol=0, atol=1e-6)
    finally:
        m.delete_adapter(name)
    np.testing.assert_array_equal(m.get_latent_representation(), z0)  # base restored


def test_full_model_round_trip_needs_no_backbone_folder(gf_model, tmp_path):
    import shutil

    m, a, _, tmp = gf_model
    m.set_adapter(None)
    path = m.save(tmp_path / "m")
    copy = tmp_path / "moved"
    shutil.copytree(tmp / "gf", copy)
    shutil.rmtree(tmp / "gf")  # the saved model holds the BERT weights it was built with
    try:
        back = sfa.model.SCFM.load(path, adata=a)
        np.testing.assert_array_equal(
            back.get_latent_representation(), m.get_latent_representation()
        )
    finally:
        shutil.copytree(copy, tmp / "gf")


def test_vocabulary_mismatch_is_reported(tmp_path):
    from conftest import make_adata

    a = make_adata()
    sfa.model.SCFM.setup_anndata(a)
    path = backbone_dir(tmp_path, n_known=8)  # 8 of 40 genes: 20%
    with pytest.raises(GeneMismatchError, match=r"20\.0% of the 40 genes"):
        sfa.model.SCFM(a, tokenizer="geneformer", backbone=path, **SIZES)
    m = sfa.model.SCFM(
        a,
        tokenizer="geneformer",
        backbone=path,
        tokenizer_kwargs={"min_vocab_fraction": 0.1},
        **SIZES,
    )
    assert m.module.hparams_["tokenizer_options"]["vocab_fraction"] == pytest.approx(0.2)
    # genes outside the vocabulary never become tokens
    ids, _ = m.module.encoder.tokenize(torch.log1p(torch.as_tensor(a.X[:4].toarray())))
    assert set(ids.unique().tolist()) <= set(range(2, 10)) | {0}


def test_gene_id_key_maps_names(tmp_path):
    from conftest import make_adata

    a = make_adata()
    a.var["ensembl"] = [f"gene{i}" for i in range(40)]
    a.var_names = [f"SYM{i}" for i in range(40)]
    sfa.model.SCFM.setup_anndata(a)
    path = backbone_dir(tmp_path)
    m = sfa.model.SCFM(
        a,
        tokenizer="geneformer",
        backbone=path,
        tokenizer_kwargs={"gene_id_key": "ensembl"},
        **SIZES,
    )
    assert m.module.hparams_["tokenizer_options"]["vocab_fraction"] == pytest.approx(34 / 40)
    with pytest.raises(ValueError, match="gene_id_key"):
        sfa.model.SCFM(
            a,
            tokenizer="geneformer",
            backbone=path,
            tokenizer_kwargs={"gene_id_key": "x"},
            **SIZES,
        )


def test_annotation_on_the_external_backbone(gf_model):
    from conftest import make_adata

    m, _, _, _ = gf_model
    m.set_adapter(None)
    full = make_adata(n_cells=480, seed=4)  # one tissue: train on half, test on the rest
    train, test = full[:240].copy(), full[240:].copy()
    accs = {}
    for strategy in ("linear_probe", "lora"):
        sfa.model.CellAnnotator.setup_anndata(train, labels_key="cell_type")
        ann = sfa.model.CellAnnotator(train, pretrained=m, strategy=strategy)
        ann.train(max_epochs=20, lr=1e-2, enable_progress_bar=False, batch_size=32)
        pred = ann.predict(test)
        accs[strategy] = (pred == test.obs["cell_type"].astype(str).to_numpy()).mean()
    # 3 balanced types: chance is 1/3. The BERT is random, so a frozen one (linear probe)
    # gives weak features; LoRA inside it must learn the types.
    assert accs["lora"] > 0.7 and accs["lora"] > accs["linear_probe"], accs


def test_perturbation_on_the_external_backbone(gf_model):
    from conftest import make_perturbation_adata, toy_features

    a = make_perturbation_adata(n_per_group=24, n_genes=40)
    a.var_names = [f"gene{i}" for i in range(40)]
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    tmp_path = gf_model[3]
    pm = sfa.model.PerturbationModel(
        a,
        gene_features=toy_features(),
        n_ensemble=2,
        hidden=32,
        gene_likelihood="poisson",
        tokenizer="geneformer",
        backbone=tmp_path / "gf",
        **{k: v for k, v in SIZES.items()},
    )
    pm.train(max_epochs=4, head_steps=40, progress=False, calibration_cells=32)
    ctrl = a[(a.obs["condition"] == "control").to_numpy()].copy()
    pred = pm.predict_perturbation(ctrl, ["A", "A+B"], n_samples=10, seed=0)
    assert pred.n_obs == 20 and np.isfinite(pred.layers["scfm_expected"]).all()
    assert pm.backbone.module.tokenizer == "geneformer"

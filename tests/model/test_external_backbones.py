"""External backbones (a Geneformer-style BERT, scGPT's transformer) from a local folder as
the SCFM encoder: adaptation strategies, adapters that round-trip, annotation and
perturbation on top, vocabulary errors, what a saved model records.

The checkpoints are small random models written in each one's on-disk format
(:func:`~scfm_adapt.data.write_random_geneformer`, :func:`~scfm_adapt.data.write_random_scgpt`);
real weights cannot be downloaded here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scfm_adapt as sfa
from scfm_adapt.data import write_random_geneformer, write_random_scgpt
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


BACKBONES = ("geneformer", "scgpt")


def backbone_dir(tmp_path, kind: str = "geneformer", n_known: int = 34):
    """A random checkpoint folder of ``kind`` knowing genes 0..n_known-1 of make_adata,
    plus others."""
    genes = [f"gene{i}" for i in range(n_known)] + [f"OTHER{i}" for i in range(20)]
    if kind == "scgpt":
        return write_random_scgpt(tmp_path / kind, genes, max_seq_len=32)
    return write_random_geneformer(tmp_path / kind, genes, max_len=32)


@pytest.fixture(scope="module", params=BACKBONES)
def backbone_model(request, tmp_path_factory):
    from conftest import make_adata

    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    path = backbone_dir(tmp, kind)
    a = make_adata(n_cells=160, seed=3)
    sfa.model.SCFM.setup_anndata(a, batch_key="batch")
    m = sfa.model.SCFM(a, tokenizer=kind, backbone=path, **SIZES)
    before = {k: v.clone() for k, v in m.module.encoder.state_dict().items()}
    m.train(max_epochs=4, stage="vae", **FAST)
    return m, a, before, tmp


def _backbone_keys(model, state):
    return [k for k in state if k.startswith(model.module.encoder.pretrained_prefixes)]


def _backbone_params(model) -> tuple[str, ...]:
    return tuple(f"encoder.{p}" for p in model.module.encoder.pretrained_prefixes)


def test_base_training_keeps_the_backbone_frozen(backbone_model):
    m, _, before, _ = backbone_model
    after = m.module.encoder.state_dict()
    bert = _backbone_keys(m, before)
    assert bert and all(torch.equal(before[k], after[k]) for k in bert)
    assert not torch.equal(before["head.weight"], after["head.weight"])  # the read-out trains
    elbo = m.history["vae"]["elbo_train"].to_numpy().ravel()
    assert elbo[-1] < elbo[0]
    opts = m.module.hparams_["tokenizer_options"]
    assert opts["vocab_fraction"] == pytest.approx(34 / 40)
    assert opts["sha256"] and len(opts["gene_token_ids"]) == 40
    # a frozen backbone reads every cell the same way: no dropout unless asked for
    if m.module.tokenizer == "scgpt":
        assert {b.dropout.p for b in m.module.encoder.blocks} == {0.0}
    else:
        cfg = m.module.encoder.bert_config
        assert cfg["hidden_dropout_prob"] == cfg["attention_probs_dropout_prob"] == 0.0
        assert cfg["checkpoint_dropout"] == [0.02, 0.02]
    report = m.backbone_info_
    assert report["tokenizer"] == m.module.tokenizer and report["sha256"] == opts["sha256"]
    assert (report["n_genes"], report["n_in_vocab"]) == (40, 34)
    x = m.adata.X
    share = x[:, :34].sum() / x.sum()  # the genes gene0..gene33 are the known ones
    assert report["count_share"] == pytest.approx(share)
    assert set(report["missing_examples"]) == {f"gene{i}" for i in range(34, 40)}


@pytest.mark.parametrize("strategy", ["lora", "adapter", "partial", "full", "linear_probe"])
def test_strategies_start_as_no_ops_and_adapters_round_trip(backbone_model, strategy, tmp_path):
    m, a, _, _ = backbone_model
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
            if on and n.startswith(_backbone_params(m))
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


def test_full_model_round_trip_needs_no_backbone_folder(backbone_model, tmp_path):
    import shutil

    m, a, _, tmp = backbone_model
    m.set_adapter(None)
    kind = m.module.tokenizer
    path = m.save(tmp_path / "m")
    copy = tmp_path / "moved"
    shutil.copytree(tmp / kind, copy)
    shutil.rmtree(tmp / kind)  # the saved model holds the backbone weights it was built with
    try:
        back = sfa.model.SCFM.load(path, adata=a)
        np.testing.assert_array_equal(
            back.get_latent_representation(), m.get_latent_representation()
        )
        # it records where the weights came from and which they were
        opts = back.module.hparams_["tokenizer_options"]
        weights = "best_model.pt" if kind == "scgpt" else "model.safetensors"
        assert opts["source"] == str((tmp / kind).resolve())
        assert opts["sha256"] == sfa.data.file_sha256(copy / weights)
        card = (path / "README.md").read_text()
        assert f"- external backbone: {kind} from `{opts['source']}`" in card
        assert f"`{opts['sha256'][:16]}`); 34 of 40 genes in its vocabulary" in card
    finally:
        shutil.copytree(copy, tmp / kind)


@pytest.mark.parametrize("kind", BACKBONES)
def test_vocabulary_mismatch_is_reported(kind, tmp_path):
    from conftest import make_adata

    a = make_adata()
    sfa.model.SCFM.setup_anndata(a)
    path = backbone_dir(tmp_path, kind, n_known=8)  # 8 of 40 genes: 20%
    with pytest.raises(GeneMismatchError, match=r"20\.0% of the 40 genes"):
        sfa.model.SCFM(a, tokenizer=kind, backbone=path, **SIZES)
    m = sfa.model.SCFM(
        a,
        tokenizer=kind,
        backbone=path,
        tokenizer_kwargs={"min_vocab_fraction": 0.1},
        **SIZES,
    )
    assert m.module.hparams_["tokenizer_options"]["vocab_fraction"] == pytest.approx(0.2)
    # genes outside the vocabulary never become tokens
    enc = m.module.encoder
    ids = enc.tokenize(torch.log1p(torch.as_tensor(a.X[:4].toarray())))[0]
    known = set(enc.gene_token_ids[:8].tolist())
    assert set(ids.unique().tolist()) - known <= {enc.pad_id, enc.cls_id}


@pytest.mark.parametrize("kind", BACKBONES)
def test_gene_id_key_maps_names(kind, tmp_path):
    from conftest import make_adata

    a = make_adata()
    a.var["vocab_key"] = [f"gene{i}" for i in range(40)]
    a.var_names = [f"SYM{i}" for i in range(40)]
    sfa.model.SCFM.setup_anndata(a)
    path = backbone_dir(tmp_path, kind)
    m = sfa.model.SCFM(
        a,
        tokenizer=kind,
        backbone=path,
        tokenizer_kwargs={"gene_id_key": "vocab_key"},
        **SIZES,
    )
    assert m.module.hparams_["tokenizer_options"]["vocab_fraction"] == pytest.approx(34 / 40)
    with pytest.raises(ValueError, match="gene_id_key"):
        sfa.model.SCFM(
            a,
            tokenizer=kind,
            backbone=path,
            tokenizer_kwargs={"gene_id_key": "x"},
            **SIZES,
        )


def test_annotation_on_the_external_backbone(backbone_model):
    import scvi

    from conftest import make_adata

    scvi.settings.seed = 0  # the backbones are random: fix what the annotators start from
    m, _, _, _ = backbone_model
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


def test_perturbation_on_the_external_backbone(backbone_model):
    from conftest import make_perturbation_adata, toy_features

    a = make_perturbation_adata(n_per_group=24, n_genes=40)
    a.var_names = [f"gene{i}" for i in range(40)]
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    tmp_path = backbone_model[3]
    pm = sfa.model.PerturbationModel(
        a,
        gene_features=toy_features(),
        n_ensemble=2,
        hidden=32,
        gene_likelihood="poisson",
        tokenizer=backbone_model[0].module.tokenizer,
        backbone=tmp_path / backbone_model[0].module.tokenizer,
        **{k: v for k, v in SIZES.items()},
    )
    pm.train(max_epochs=4, head_steps=40, progress=False, calibration_cells=32)
    ctrl = a[(a.obs["condition"] == "control").to_numpy()].copy()
    pred = pm.predict_perturbation(ctrl, ["A", "A+B"], n_samples=10, seed=0)
    assert pred.n_obs == 20 and np.isfinite(pred.layers["scfm_expected"]).all()
    assert pm.backbone.module.tokenizer == backbone_model[0].module.tokenizer


def test_scgpt_options_reach_the_encoder(tmp_path):
    from conftest import make_adata

    a = make_adata()
    sfa.model.SCFM.setup_anndata(a)
    path = backbone_dir(tmp_path, "scgpt")
    m = sfa.model.SCFM(a, tokenizer="scgpt", backbone=path, **SIZES)
    enc = m.module.encoder
    # a frozen backbone reads every cell the same way: no dropout by default
    assert {b.dropout.p for b in enc.blocks} == {0.0} and enc.max_len == 31
    opts = m.module.hparams_["tokenizer_options"]
    assert opts["config"]["checkpoint_dropout"] == 0.2
    assert opts["dropped_heads"] == ["cls_decoder", "decoder", "mvc_decoder"]
    kw = {"backbone_dropout": 0.2, "max_len": 10, "tie_break": "random", "cls_value": 0}
    m = sfa.model.SCFM(a, tokenizer="scgpt", backbone=path, tokenizer_kwargs=kw, **SIZES)
    enc = m.module.encoder
    assert {b.dropout.p for b in enc.blocks} == {0.2}
    assert (enc.max_len, enc.tie_break, enc.cls_value) == (10, "random", 0.0)
    for bad, match in (
        ({"max_len": 40}, "reads at most 31 genes"),
        ({"tie_break": "x"}, "tie_break"),
    ):
        with pytest.raises(ValueError, match=match):
            sfa.model.SCFM(a, tokenizer="scgpt", backbone=path, tokenizer_kwargs=bad, **SIZES)
    with pytest.raises(ValueError, match="needs backbone="):
        sfa.model.SCFM(a, tokenizer="scgpt", **SIZES)


def test_adapter_refuses_another_backbone_checkpoint(backbone_model, tmp_path):
    from conftest import make_adata

    m = backbone_model[0]
    kind = m.module.tokenizer
    m.set_adapter(None)
    m.adapt("lora", name="mine", parts=("encoder",), verbose=False)
    try:
        saved = m.save_adapter(tmp_path / "adapter", name="mine")
    finally:
        m.delete_adapter("mine")
    genes = [f"gene{i}" for i in range(34)] + [f"OTHER{i}" for i in range(20)]
    if kind == "scgpt":  # same sizes and genes, other weights
        other = write_random_scgpt(tmp_path / "other", genes, max_seq_len=32, seed=5)
    else:
        other = write_random_geneformer(tmp_path / "other", genes, max_len=32, seed=5)
    b = make_adata(n_cells=160, seed=3)
    sfa.model.SCFM.setup_anndata(b, batch_key="batch")
    m2 = sfa.model.SCFM(b, tokenizer=kind, backbone=other, **SIZES)
    with pytest.raises(ValueError, match="external backbone's weights differ"):
        m2.load_adapter(saved)


def test_distilled_student_reads_cells_itself(backbone_model):
    m = backbone_model[0]
    m.set_adapter(None)
    student = sfa.model.distill(
        m, max_epochs=1, encoder_hidden=8, encoder_depth=1, decoder_hidden=16, **FAST
    )
    assert student.module.tokenizer == "latent" and student.backbone_info_ is None
    assert student.get_latent_representation().shape == m.get_latent_representation().shape

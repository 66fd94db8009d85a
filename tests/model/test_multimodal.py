"""SCFM on MuData: setup_mudata validation, masking of missing modalities, cross-modal
prediction, paired generation, save/load and the muon workflow.

Synthetic MuData (unit tests only) for the fast checks; the real CITE-seq and multiome files
for round trips (skipped when ../shared/data is absent).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scfm_adapt as sfa
from scfm_adapt.errors import InvalidCountsError, ModalityError

MODS = {"rna": "rna", "protein": "prot", "atac": "atac"}
SMALL = {
    "n_tokens": 4,
    "token_dim": 8,
    "encoder_hidden": 32,
    "decoder_hidden": 64,
    "dit_hidden": 32,
    "dit_depth": 1,
}
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def make_mudata(n: int = 160, seed: int = 0):
    """Two cell types; a protein and an ATAC program per type; batch b1's panel lacks the
    first two proteins. For unit tests only."""
    import anndata as ad
    import mudata as md
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    types = np.arange(n) % 2
    names = [f"c{i}" for i in range(n)]
    rna_mu = rng.gamma(2.0, 1.0, (2, 40))[types] * rng.uniform(0.5, 2, n)[:, None]
    rna = rng.poisson(rna_mu).astype(np.float32)
    rna[:, 0] += 1
    prot_mu = np.where(np.arange(6)[None, :] % 2 == types[:, None], 200.0, 10.0)
    prot = rng.negative_binomial(10, 10 / (10 + prot_mu)).astype(np.float32)
    atac_mu = np.where(np.arange(20)[None, :] < 10, 1.0 + 2 * types[:, None], 0.5)
    atac = rng.poisson(atac_mu).astype(np.float32)
    batch = np.where(np.arange(n) < n // 2, "b0", "b1")
    prot[batch == "b1", :2] = 0

    def mod(x, prefix, dense=False):
        a = ad.AnnData(x if dense else sparse.csr_matrix(x))
        a.obs_names = names
        a.var_names = [f"{prefix}{j}" for j in range(x.shape[1])]
        return a

    mdata = md.MuData({"rna": mod(rna, "g"), "prot": mod(prot, "p", True), "atac": mod(atac, "r")})
    mdata.obs["batch"] = pd.Categorical(batch)
    mdata.obs["cell_type"] = pd.Categorical([f"t{t}" for t in types])
    return mdata


@pytest.fixture(scope="module")
def trained():
    scvi = pytest.importorskip("scvi")
    scvi.settings.seed = 0
    torch.manual_seed(0)
    mdata = make_mudata()
    # The last 40 cells lack protein (masked, like cells measured by RNA + ATAC only).
    mdata.mod["prot"].X[-40:] = 0
    sfa.model.SCFM.setup_mudata(mdata, modalities=MODS, batch_key="batch")
    model = sfa.model.SCFM(mdata, **SMALL)
    model.train(max_epochs=60, max_epochs_prior=30, batch_size=64, **QUIET)
    return model, mdata


# --------------------------------------------------------------------------- validation
def test_setup_mudata_errors():
    mdata = make_mudata(40)
    with pytest.raises(ModalityError, match=r"\['protein'\] = 'adt' is not a modality.*'prot'"):
        sfa.model.SCFM.setup_mudata(mdata, modalities={"rna": "rna", "protein": "adt"})
    with pytest.raises(ModalityError, match="must map 'rna'"):
        sfa.model.SCFM.setup_mudata(mdata, modalities={"protein": "prot"})
    with pytest.raises(ModalityError, match="Unknown modality roles \\['hic'\\]"):
        sfa.model.SCFM.setup_mudata(mdata, modalities={"rna": "rna", "hic": "atac"})
    with pytest.raises(KeyError, match=r"'donor' is not a column of mdata\.obs"):
        sfa.model.SCFM.setup_mudata(mdata, modalities=MODS, batch_key="donor")
    with pytest.raises(TypeError, match=r"needs a mudata\.MuData"):
        sfa.model.SCFM.setup_mudata(mdata.mod["rna"], modalities=MODS)


def test_setup_mudata_non_counts():
    mdata = make_mudata(40)
    mdata.mod["prot"].X = np.log1p(mdata.mod["prot"].X)
    with pytest.raises(InvalidCountsError, match=r"mdata.mod\['prot'\].X contains non-integer"):
        sfa.model.SCFM.setup_mudata(mdata, modalities=MODS)
    mdata = make_mudata(40)
    mdata.mod["atac"].X.data[0] = -1
    with pytest.raises(InvalidCountsError, match=r"mdata.mod\['atac'\].X contains negative"):
        sfa.model.SCFM.setup_mudata(mdata, modalities=MODS)


def test_setup_mudata_mismatched_cells_and_pairing():
    import mudata as md

    full = make_mudata(40)
    # protein measured for 30 of the 40 cells only
    unpaired = md.MuData({"rna": full.mod["rna"], "prot": full.mod["prot"][:30].copy()})
    with pytest.raises(ModalityError, match=r"cover different cells.*pair_modalities"):
        sfa.model.SCFM.setup_mudata(unpaired, modalities={"rna": "rna", "protein": "prot"})
    before = unpaired.mod["prot"].X.copy()
    paired = sfa.data.pair_modalities(unpaired)
    np.testing.assert_array_equal(unpaired.mod["prot"].X, before)  # input untouched
    assert paired.mod["prot"].n_obs == 40
    np.testing.assert_array_equal(paired.obs["scfm_has_prot"], np.arange(40) < 30)
    x = paired.mod["prot"].X.toarray()
    assert (x[30:] == 0).all()
    np.testing.assert_array_equal(x[:30], full.mod["prot"].X[:30])
    sfa.model.SCFM.setup_mudata(paired, modalities={"rna": "rna", "protein": "prot"})


# --------------------------------------------------------------------------- masking
def test_protein_panel_mask(trained):
    model, _ = trained
    mask = model.module.protein_mask.numpy()
    # b0 measured all 6 proteins, b1 all but the first 2
    np.testing.assert_array_equal(mask[0], np.ones(6, bool))
    np.testing.assert_array_equal(mask[1], [False, False, True, True, True, True])


def test_missing_modality_is_masked_not_zero_filled(trained):
    """A cell lacking protein is encoded exactly as the same cell with its protein hidden,
    and differently from the cell with its protein shown."""
    model, mdata = trained
    module = model.module.eval()
    tensors = next(iter(model._batches(mdata, np.arange(8), 8)))
    inp = module._get_inference_input(tensors)
    shown = module.inference(**inp)["qz"].loc
    hidden = module.inference(**inp, given=("rna", "atac"))["qz"].loc
    inp_zero = {
        **inp,
        "extra": {**inp["extra"], "protein": torch.zeros_like(inp["extra"]["protein"])},
    }
    zeroed = module.inference(**inp_zero)
    assert not zeroed["observed"]["protein"].any()
    torch.testing.assert_close(zeroed["qz"].loc, hidden, rtol=0, atol=0)
    assert (shown - hidden).abs().max() > 1e-3


def test_missing_modality_leaves_likelihood(trained):
    """Cells without protein add nothing to the protein likelihood term; cells with it do."""
    model, mdata = trained
    module = model.module.eval()
    tensors = next(iter(model._batches(mdata, np.arange(mdata.n_obs - 8, mdata.n_obs), 8)))
    _, _, loss = module(tensors)
    assert float(loss.extra_metrics["reconstruction_protein"]) == 0.0
    tensors = next(iter(model._batches(mdata, np.arange(8), 8)))
    _, _, loss = module(tensors)
    assert float(loss.extra_metrics["reconstruction_protein"]) > 0.0


def test_modality_dropout_only_in_training(trained):
    model, _ = trained
    module = model.module
    present = {
        "rna": torch.ones(2000, dtype=torch.bool),
        "protein": torch.arange(2000) < 1000,  # half the cells have protein
    }
    torch.manual_seed(0)
    shown = module._modality_dropout(present)
    both = present["protein"]
    hidden_both = (~shown["rna"] | ~shown["protein"])[both].float().mean()
    assert abs(float(hidden_both) - module.p_modality_dropout) < 0.05
    assert shown["rna"][~both].all()  # a cell's only modality is never hidden
    assert not (~shown["rna"] & ~shown["protein"]).any()


# --------------------------------------------------------------------------- behaviour
def test_training_loss_falls(trained):
    model, _ = trained
    hist = model.history["vae"]
    # Every head starts at the data's mean scale (gene shares, protein quantiles, ATAC
    # library), so the first epochs are already close to the floor of these toy data.
    for key, factor in (("rna", 0.95), ("protein", 0.9), ("atac", 0.95)):
        curve = hist[f"reconstruction_{key}_train"].iloc[:, 0].to_numpy(dtype=float)
        assert curve[-5:].mean() < factor * curve[:3].mean(), key


def test_cross_modal_protein_from_rna(trained):
    """Protein predicted from RNA alone separates the two cell types as the real protein
    does, also on the cells whose protein the model never saw."""
    model, mdata = trained
    types = (mdata.obs["cell_type"] == "t1").to_numpy()
    pred = model.get_normalized_expression(mdata, modality="protein", given=("rna",))
    assert pred.shape == (mdata.n_obs, 6)
    assert list(pred.columns) == [f"p{j}" for j in range(6)]
    lp = np.log1p(pred.to_numpy())
    unseen = np.arange(mdata.n_obs) >= mdata.n_obs - 40
    for j in range(2, 6):  # proteins every batch measured
        high = types if j % 2 else ~types  # protein j is high in type j % 2
        gap = lp[unseen & high, j].mean() - lp[unseen & ~high, j].mean()
        assert gap > 0.5, (j, gap)
    # An AnnData of RNA alone gives the same prediction.
    rna = mdata.mod["rna"].copy()
    rna.obs["batch"] = mdata.obs["batch"].to_numpy()
    alone = model.get_normalized_expression(rna, modality="protein")
    np.testing.assert_allclose(alone.to_numpy(), pred.to_numpy(), rtol=1e-5)


def test_rna_output_and_atac(trained):
    model, mdata = trained
    rna = model.get_normalized_expression(mdata, library_size=1.0)
    assert rna.shape == (mdata.n_obs, 40)
    np.testing.assert_allclose(rna.sum(1), 1.0, rtol=1e-4)
    atac = model.get_normalized_expression(mdata, modality="atac", library_size=1.0)
    np.testing.assert_allclose(atac.sum(1), 1.0, rtol=1e-4)
    with pytest.raises(ValueError, match="modality='hic'"):
        model.get_normalized_expression(mdata, modality="hic")
    with pytest.raises(ValueError, match="lacks: \\['hic'\\]"):
        model.get_normalized_expression(mdata, modality="protein", given=("hic",))


def test_tl_writes_mudata_slots(trained):
    model, mdata = trained
    m = mdata.copy()
    before = {k: m.mod[k].X.copy() for k in m.mod}
    sfa.tl.embed(m, model)
    # every modality's tokens, joined (module.n_tokens counts them all)
    assert m.obsm["X_scfm"].shape == (m.n_obs, model.module.n_tokens * 8)
    sfa.tl.normalize_expression(m, model)
    for name, n_var in (("rna", 40), ("prot", 6), ("atac", 20)):
        assert m.mod[name].layers["scfm_normalized"].shape == (m.n_obs, n_var)
        x = m.mod[name].X
        np.testing.assert_array_equal(
            x.toarray() if hasattr(x, "toarray") else x,
            before[name].toarray() if hasattr(before[name], "toarray") else before[name],
        )
    assert m.uns["scfm_normalized"]["params"]["modalities"] == MODS


def test_muon_workflow(trained, tmp_path):
    mu = pytest.importorskip("muon")
    sc = pytest.importorskip("scanpy")
    model, mdata = trained
    m = mdata.copy()
    sfa.tl.embed(m, model)
    # muon 0.1.9's own neighbours are WNN over per-modality graphs and take no use_rep,
    # and its UMAP and Leiden read that WNN graph; a joint embedding goes through scanpy's
    # functions, which act on a MuData's obsm/obsp, then back into muon (plot, .h5mu).
    sc.pp.neighbors(m, use_rep="X_scfm", n_neighbors=15)
    sc.tl.umap(m)
    sc.tl.leiden(m, resolution=0.5, flavor="igraph", n_iterations=2)
    assert m.obsm["X_umap"].shape == (m.n_obs, 2)
    labels = m.obs["leiden"].astype(str).to_numpy()
    types = m.obs["cell_type"].astype(str).to_numpy()
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(types, labels) > 0.5  # the clusters recover the two types
    mu.pl.embedding(m, basis="X_umap", color="leiden", show=False)
    m.write(tmp_path / "scfm.h5mu")
    back = mu.read(str(tmp_path / "scfm.h5mu"))
    np.testing.assert_array_equal(back.obsm["X_scfm"], m.obsm["X_scfm"])


def test_generate_paired_cells(trained):
    model, _ = trained
    gen = model.generate({"batch": ["b0"] * 6 + ["b1"] * 6}, seed=1)
    assert set(gen.mod) == {"rna", "prot", "atac"}
    assert gen.n_obs == 12
    assert gen.mod["prot"].shape == (12, 6) and gen.mod["atac"].shape == (12, 20)
    for name in gen.mod:
        x = gen.mod[name].X.toarray()
        assert (x >= 0).all() and (x == np.round(x)).all()
        assert "scfm_expected" in gen.mod[name].layers
    assert list(gen.obs["batch"]) == ["b0"] * 6 + ["b1"] * 6
    again = model.generate({"batch": ["b0"] * 6 + ["b1"] * 6}, seed=1)
    np.testing.assert_array_equal(gen.mod["prot"].X.toarray(), again.mod["prot"].X.toarray())


def test_save_load_round_trip(trained, tmp_path):
    model, mdata = trained
    z = model.get_latent_representation(mdata)
    prot = model.get_normalized_expression(mdata, modality="protein", given=("rna",))
    model.save(tmp_path / "mm")
    assert not any(p.suffix in (".pt", ".pkl") for p in (tmp_path / "mm").iterdir())
    loaded = sfa.model.SCFM.load(tmp_path / "mm")
    assert loaded.is_multimodal and loaded.modalities_ == MODS
    np.testing.assert_allclose(loaded.get_latent_representation(mdata), z, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        loaded.get_normalized_expression(mdata, modality="protein", given=("rna",)).to_numpy(),
        prot.to_numpy(),
        rtol=1e-5,
    )
    onto = sfa.model.SCFM.load(tmp_path / "mm", adata=mdata)
    np.testing.assert_allclose(onto.get_latent_representation(), z, rtol=0, atol=1e-6)
    with pytest.raises(sfa.errors.ModalityError, match="holds a MuData model"):
        sfa.model.SCFM.load(tmp_path / "mm", adata=mdata.mod["rna"])
    other = mdata.copy()
    other.mod["prot"].var_names = [f"q{j}" for j in range(6)]
    with pytest.raises(sfa.errors.GeneMismatchError, match="Modality 'prot'"):
        loaded.get_latent_representation(other)


def test_lora_on_joint_sequence(trained):
    """The adaptation strategies act on the joint token sequence unchanged."""
    model, mdata = trained
    z = model.get_latent_representation(mdata)
    model.module.add_adapter("mm_lora", "lora", parts=("encoder",), rank=2)
    try:
        model.module.set_adapter("mm_lora")
        report = model.module.parameter_report("vae")
        assert 0 < report["fraction"] < 0.1
        np.testing.assert_allclose(model.get_latent_representation(mdata), z, atol=1e-6)
    finally:
        model.module.set_adapter(None)
        model.module.delete_adapter("mm_lora")


# --------------------------------------------------------------------------- real data
def _subset_genes(mdata, n_genes: int):
    import mudata as md

    rna = mdata.mod["rna"]
    total = np.asarray(rna.X.sum(0)).ravel()
    keep = np.argsort(-total)[:n_genes]
    out = md.MuData(
        {
            k: (rna[:, np.sort(keep)].copy() if k == "rna" else v.copy())
            for k, v in mdata.mod.items()
        }
    )
    for col in mdata.obs.columns:
        if ":" not in col:
            out.obs[col] = mdata.obs[col].to_numpy()
    return out


def test_citeseq_round_trip(shared_data, tmp_path):
    mdata = _subset_genes(sfa.datasets.citeseq_mudata(), 300)
    assert mdata.mod["protein"].shape == (400, 29)
    sfa.model.SCFM.setup_mudata(
        mdata, modalities={"rna": "rna", "protein": "protein"}, batch_key="batch"
    )
    model = sfa.model.SCFM(mdata, **SMALL)
    mask = model.module.protein_mask.numpy()
    assert mask.sum(1).tolist() == [14, 29]  # pbmc10k measured 14 proteins, pbmc5k 29
    model.train(max_epochs=15, max_epochs_prior=3, **QUIET)
    z = model.get_latent_representation(mdata)
    assert z.shape == (400, model.module.n_tokens * 8) and np.isfinite(z).all()
    rna_only = mdata.mod["rna"].copy()
    rna_only.obs["batch"] = mdata.obs["batch"].to_numpy()
    prot = model.get_normalized_expression(rna_only, modality="protein")
    assert prot.shape == (400, 29) and (prot.to_numpy() >= 0).all()
    gen = model.generate({"batch": ["pbmc5k"] * 4}, seed=0)
    assert gen.mod["protein"].shape == (4, 29)
    model.save(tmp_path / "cite")
    loaded = sfa.model.SCFM.load(tmp_path / "cite", adata=mdata)
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-6)


def test_multiome_round_trip(shared_data, tmp_path):
    mdata = sfa.datasets.multiome()
    sfa.model.SCFM.setup_mudata(mdata, modalities={"rna": "rna", "atac": "atac"})
    model = sfa.model.SCFM(mdata, **SMALL)
    model.train(max_epochs=5, stage="vae", **QUIET)
    z = model.get_latent_representation(mdata)
    assert z.shape == (1000, model.module.n_tokens * 8) and np.isfinite(z).all()
    atac = model.get_normalized_expression(mdata, modality="atac", given=("rna",))
    assert atac.shape == (1000, 174)
    model.save(tmp_path / "mo")
    loaded = sfa.model.SCFM.load(tmp_path / "mo")
    np.testing.assert_allclose(loaded.get_latent_representation(mdata), z, atol=1e-6)

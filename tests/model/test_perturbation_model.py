"""PerturbationModel: predictions, uncertainty, OOD scores, doses, save / load,
unseen genes and combinations, a pretrained backbone."""

from __future__ import annotations

import numpy as np
import pytest

import scfm_adapt as sfa
from conftest import control_cells, make_perturbation_adata, toy_features
from scfm_adapt import errors

B = sfa.baselines


M = sfa.metrics


D = sfa.data


@pytest.fixture(scope="module")
def pert_model():
    import scvi
    import torch

    from conftest import n_threads

    torch.set_num_threads(n_threads())
    scvi.settings.seed = 0
    a = make_perturbation_adata(n_genes=60)
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    # Poisson: the toy counts are Poisson, and an NB backbone this briefly trained explains
    # the perturbations as overdispersion (its latent collapses: KL ~1.6 nats measured)
    m = sfa.model.PerturbationModel(
        a,
        gene_features=toy_features(),
        n_ensemble=3,
        hidden=64,
        n_tokens=4,
        token_dim=8,
        gene_likelihood="poisson",
    )
    m.train(max_epochs=60, head_steps=300, progress=False, calibration_cells=64)
    return m, a


# ------------------------------------------------------------------ model
def test_prediction_slots_and_shapes(pert_model):
    m, a = pert_model
    # the default starts at the baselines in expression and builds cells from controls
    assert m.init_kwargs_["anchor"] == "expression"
    assert m.init_kwargs_["counts"] == "control_plus_change"
    ctrl = control_cells(a)
    out = m.predict_perturbation(ctrl, ["A", "A+B"], seed=0)
    assert out.shape == (2 * ctrl.n_obs, a.n_vars)
    assert list(out.var_names) == list(a.var_names)
    x = out.X.toarray()
    assert np.all(x >= 0) and np.array_equal(x, np.round(x))
    assert out.layers["scfm_expected"].shape == out.shape
    for col in (
        "condition",
        "context",
        "dose",
        "scfm_control_cell",
        "scfm_uncertainty",
        "ood_score",
    ):
        assert col in out.obs, col
    assert list(out.obs["condition"].cat.categories) == ["A", "A+B"]
    assert (out.obs["scfm_uncertainty"] > 0).all()
    for key in ("scfm_delta", "scfm_delta_lower", "scfm_delta_upper"):
        assert list(out.varm[key].columns) == ["A", "A+B"]
    lo, mid, hi = (
        out.varm[k].to_numpy() for k in ("scfm_delta_lower", "scfm_delta", "scfm_delta_upper")
    )
    assert np.all(lo < mid) and np.all(mid < hi)
    assert out.uns["scfm_perturbation"]["params"]["perturbations"] == ["A", "A+B"]
    assert out.obs_names.is_unique


def test_learned_response_points_the_right_way(pert_model):
    m, a = pert_model
    ctrl = control_cells(a)
    out = m.predict_perturbation(ctrl, ["A", "B"], seed=0)
    d = out.varm["scfm_delta"]
    # A multiplies genes 0-4 by 4: log-normalised they rise, and more than the rest
    assert d["A"].iloc[0:5].mean() > 0.3
    assert d["A"].iloc[0:5].mean() > d["A"].iloc[5:].mean() + 0.3
    assert d["B"].iloc[5:10].mean() > d["B"].iloc[0:5].mean() + 0.3
    # the predicted cells themselves carry the change
    lo = M.lognorm(out[out.obs["condition"] == "A"].X)
    assert lo[:, 0:5].mean() - M.lognorm(ctrl.X)[:, 0:5].mean() > 0.3


def test_combination_order_invariance(pert_model):
    m, a = pert_model
    ctrl = control_cells(a)
    ab = m.predict_perturbation(ctrl, "A+B", seed=3)
    ba = m.predict_perturbation(ctrl, "B+A", seed=3)
    assert np.array_equal(ab.X.toarray(), ba.X.toarray())
    assert np.allclose(ab.varm["scfm_delta"].to_numpy(), ba.varm["scfm_delta"].to_numpy())
    assert ba.obs["condition"].iloc[0] == "A+B"
    emb = m.get_perturbation_embedding(["A+B", "B+A", "A"])
    assert np.allclose(emb.iloc[0], emb.iloc[1]) and not np.allclose(emb.iloc[0], emb.iloc[2])


def test_reproducible_and_n_samples(pert_model):
    m, a = pert_model
    ctrl = control_cells(a)
    one = m.predict_perturbation(ctrl, "B", seed=1, n_samples=7)
    two = m.predict_perturbation(ctrl, "B", seed=1, n_samples=7)
    other = m.predict_perturbation(ctrl, "B", seed=2, n_samples=7)
    assert one.n_obs == 7
    assert np.array_equal(one.X.toarray(), two.X.toarray())
    assert not np.array_equal(one.X.toarray(), other.X.toarray())


def test_unseen_gene_with_features_and_without(pert_model):
    m, a = pert_model
    ctrl = control_cells(a)
    out = m.predict_perturbation(ctrl, ["D", "C+D"], seed=0)
    assert out.n_obs == 2 * ctrl.n_obs
    # D's features are A's: its predicted response resembles A's
    da = m.predict_perturbation(ctrl, "A", seed=0).varm["scfm_delta"]["A"]
    assert np.corrcoef(out.varm["scfm_delta"]["D"], da)[0, 1] > 0.5
    with pytest.raises(sfa.model.UnknownPerturbationError, match="ZZZ"):
        m.predict_perturbation(ctrl, ["A", "A+ZZZ"])


def test_ood_rises_with_distance(pert_model):
    m, _ = pert_model
    s = m.ood_score(["A", "A+B", "D", "FAR"])
    assert s["A"] == pytest.approx(0.0, abs=1e-6)
    assert s["A+B"] == pytest.approx(0.0, abs=1e-6)
    assert s["D"] < s["FAR"]
    assert s["FAR"] > 1.0


def test_bad_requests_get_clear_errors(pert_model):
    m, a = pert_model
    ctrl = control_cells(a)
    with pytest.raises(errors.SCFMInputError, match="control"):
        m.predict_perturbation(ctrl, "control")
    with pytest.raises(errors.SCFMInputError, match="No control cell matches"):
        m.predict_perturbation(ctrl, "A", covariates={"context": "nowhere"})
    with pytest.raises(errors.SCFMInputError, match="empty"):
        m.predict_perturbation(ctrl, [])
    stim = a[(a.obs["condition"] == "A").to_numpy()].copy()
    with pytest.raises(errors.SCFMInputError, match="no cell with condition='control'"):
        m.predict_perturbation(stim, "B")
    with pytest.raises(errors.GeneMismatchError):
        m.predict_perturbation(ctrl[:, 1:].copy(), "A")
    with pytest.raises(errors.SCFMInputError, match="not a number"):
        m.predict_perturbation(ctrl, "A", dose="lots")


def test_dose_changes_the_prediction(pert_model):
    m, a = pert_model
    ctrl = control_cells(a)
    d0 = m.predict_perturbation(ctrl, "A", dose=0.0, seed=0).varm["scfm_delta"]["A"]
    d1 = m.predict_perturbation(ctrl, "A", dose=1.0, seed=0).varm["scfm_delta"]["A"]
    assert d1.iloc[0:5].mean() > d0.iloc[0:5].mean() + 0.2
    assert abs(d0.iloc[0:5].mean()) < 0.2  # dose 0 is no perturbation


def test_save_load_round_trip(pert_model, tmp_path):
    m, a = pert_model
    ctrl = control_cells(a)
    m.save(tmp_path / "pm")
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "pm")
    assert not list((tmp_path / "pm").rglob("*.pt")) and not list((tmp_path / "pm").rglob("*.pkl"))
    m2 = sfa.model.PerturbationModel.load(tmp_path / "pm")
    one = m.predict_perturbation(ctrl, ["A+B", "D"], seed=0)
    two = m2.predict_perturbation(ctrl, ["A+B", "D"], seed=0)
    assert np.array_equal(one.X.toarray(), two.X.toarray())
    assert np.allclose(one.varm["scfm_delta_upper"], two.varm["scfm_delta_upper"])
    assert "PerturbationModel (trained)" in repr(m2)


def test_tl_predict_perturbation(pert_model):
    m, a = pert_model
    ctrl = control_cells(a, "ctx1")
    out = sfa.tl.predict_perturbation(ctrl, m, ["C"], seed=0, key_added="pp")
    assert out.n_obs == ctrl.n_obs
    assert set(ctrl.uns["pp"]) >= {"params", "ood_score", "delta", "delta_lower", "delta_upper"}
    assert list(ctrl.uns["pp"]["delta"].columns) == ["C"]


def test_setup_errors():
    a = make_perturbation_adata(n_per_group=5)
    with pytest.raises(ValueError, match="control_group"):
        sfa.model.PerturbationModel.setup_anndata(a, "condition", "ctrl")
    with pytest.raises(KeyError, match="nope"):
        sfa.model.PerturbationModel.setup_anndata(a, "nope", "control")
    b = a.copy()
    b.X = b.X * 0.5
    with pytest.raises(errors.InvalidCountsError):
        sfa.model.PerturbationModel.setup_anndata(b, "condition", "control")
    with pytest.raises(ValueError, match="setup_anndata"):
        sfa.model.PerturbationModel(make_perturbation_adata(n_per_group=5))


def test_real_norman_smoke(shared_data):
    """Train briefly on Norman singles, predict an unseen gene and a combination."""
    a = sfa.datasets.norman2019(dataset="norman19")
    cond = a.obs["condition"].astype(str)
    keep = cond.isin(["control", "KLF1", "MAP2K6", "CEBPE", "KLF1+MAP2K6"]).to_numpy()
    train = a[keep].copy()
    sfa.model.PerturbationModel.setup_anndata(train, "condition", "control")
    m = sfa.model.PerturbationModel(train, gene_features="go", n_ensemble=2, hidden=64)
    m.train(max_epochs=5, head_steps=50, progress=False, calibration_cells=64)
    ctrl = a[(cond == "control").to_numpy()][:40].copy()
    out = m.predict_perturbation(ctrl, ["MAP2K3", "CEBPE+KLF1"], seed=0)
    assert out.shape == (80, a.n_vars)
    assert np.isfinite(out.obs["ood_score"]).all()
    assert out.uns["scfm_perturbation"]["ood_score"]["MAP2K3"] > 0
    s = m.ood_score(["KLF1", "CEBPE+KLF1", "MAP2K3"])  # perturbation part only
    assert s["KLF1"] == pytest.approx(0.0, abs=1e-5)
    assert s["CEBPE+KLF1"] > 0 and s["MAP2K3"] > 0
    with pytest.raises(sfa.model.UnknownPerturbationError, match="NIT1"):
        m.predict_perturbation(ctrl, "NIT1")  # no GO annotation in the kept terms


def test_pretrained_backbone_adapted_with_lora():
    """A pretrained SCFM is mapped onto the data and adapted (LoRA), never modified."""
    import torch

    a = make_perturbation_adata(n_per_group=20, n_genes=40)
    ref = a.copy()
    sfa.model.SCFM.setup_anndata(ref)
    pre = sfa.model.SCFM(ref, n_tokens=4, token_dim=8)
    pre.train(max_epochs=3, stage="vae", enable_progress_bar=False)
    before = {k: v.clone() for k, v in pre.module.state_dict().items()}
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    m = sfa.model.PerturbationModel(a, pretrained=pre, gene_features=None, n_ensemble=2, hidden=32)
    assert m.backbone.active_adapter is not None
    m.train(max_epochs=2, head_steps=20, progress=False, calibration_cells=32)
    assert all(torch.equal(before[k], v) for k, v in pre.module.state_dict().items())
    out = m.predict_perturbation(control_cells(a), "A+B", seed=0)
    assert out.shape == (20, 40) and "pretrained + lora" in repr(m)


# ------------------------------------------------------------------ the latent anchor
def _anchored(head_steps: int, anchor: str = "latent", **kwargs):
    """An anchored model on the toy data without A+B in ctx1 (a held-out combination)."""
    import scvi

    scvi.settings.seed = 0
    a = make_perturbation_adata(n_genes=40)
    a = a[~((a.obs["condition"] == "A+B") & (a.obs["context"] == "ctx1")).to_numpy()].copy()
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    m = sfa.model.PerturbationModel(
        a,
        gene_features=toy_features(),
        n_ensemble=3,
        hidden=32,
        n_tokens=4,
        token_dim=8,
        gene_likelihood="poisson",
        anchor=anchor,
        **kwargs,
    )
    m.train(max_epochs=5, head_steps=head_steps, progress=False, calibration_cells=32)
    return m, a


@pytest.fixture(scope="module")
def untrained_anchor():
    return _anchored(head_steps=0, counts="control_plus_change")


def test_an_untrained_anchored_model_is_the_latent_additive_baseline(untrained_anchor):
    import torch

    m, a = untrained_anchor
    cells = m._encode_cells(a)
    zs = m._std(cells["z"])
    cond, ctx = a.obs["condition"].to_numpy(), a.obs["context"].to_numpy()

    def shift(p, c):  # the observed shift of a training unit in the standardised latent
        return zs[(cond == p) & (ctx == c)].mean(0) - zs[(cond == "control") & (ctx == c)].mean(0)

    req = m._encode_requests([(("A", "B"), (1.0, 1.0))])
    ctrl = zs[(cond == "control") & (ctx == "ctx1")]
    ctx1 = m._context_index(["ctx1"] * len(ctrl))
    additive = shift("A", "ctx1") + shift("B", "ctx1")
    # predictions start from the anchor fitted on every training unit: the held-out
    # combination in ctx1 is the sum of its parts' shifts in ctx1, for every cell
    deltas = m._member_deltas(ctrl, *req, ctx1)  # (members, cells, D)
    torch.testing.assert_close(deltas, additive.expand_as(deltas))
    # each member's own anchor (for calibration out of bag) knows only its in-bag units
    own = m._member_deltas(ctrl, *req, ctx1, full=False)
    units = [(u[0], tuple(u[1])) for u in m.units_]
    for k in range(len(m.heads)):
        left_out = {units[i] for i in m.oob_[k]}
        if not ({("ctx1", ("A",)), ("ctx1", ("B",))} & left_out):
            torch.testing.assert_close(own[k], additive.expand_as(own[k]))
        if ("ctx1", ("A",)) in left_out and ("ctx1", ("B",)) not in left_out:
            # A from ctx0 instead: latent arithmetic
            a_ctx0 = shift("A", "ctx0") + shift("B", "ctx1")
            torch.testing.assert_close(own[k][0], a_ctx0)
    # order of the parts and dose 0
    swapped = m._member_deltas(ctrl, *m._encode_requests([(("B", "A"), (1.0, 1.0))]), ctx1)
    torch.testing.assert_close(swapped, deltas)
    none = m._member_deltas(ctrl, *m._encode_requests([(("A",), (0.0,))]), ctx1)
    assert torch.all(none == 0)


def test_an_unseen_gene_gets_the_anchor_of_its_features(untrained_anchor):
    import torch

    m, _ = untrained_anchor
    anchor = m.anchors_[0]
    req = m._encode_requests([(("D",), (1.0,))])  # D: never perturbed, with features
    got = anchor(torch.tensor([0]), *req)[0]
    f = torch.as_tensor(toy_features().loc["D"].to_numpy())
    want = anchor.feature_shift + (f - anchor.feature_mean) @ anchor.feature_map
    torch.testing.assert_close(got, want)
    assert anchor.part_known[m.vocab_["A"]] == 1 and "D" not in m.vocab_


def test_anchored_heads_keep_a_share_chosen_out_of_bag_and_round_trip(tmp_path):
    m, a = _anchored(head_steps=40)
    assert len(m.correction_weights_) == 3
    assert all(w in sfa.model._perturbation.CORRECTION_GRID for w in m.correction_weights_)
    ctrl = control_cells(a, "ctx1")
    m.save(tmp_path / "anchored")
    m2 = sfa.model.PerturbationModel.load(tmp_path / "anchored")
    assert m2.correction_weights_ == m.correction_weights_ and m2.contexts_ == m.contexts_
    one = m.predict_perturbation(ctrl, ["A+B", "D"], covariates={"context": "ctx1"}, seed=0)
    two = m2.predict_perturbation(ctrl, ["A+B", "D"], covariates={"context": "ctx1"}, seed=0)
    assert np.array_equal(one.X.toarray(), two.X.toarray())
    assert np.allclose(one.varm["scfm_delta"], two.varm["scfm_delta"])
    np.testing.assert_allclose(one.layers["scfm_lognorm"], two.layers["scfm_lognorm"], atol=1e-6)


def test_the_correction_share_is_kept_only_when_it_beats_the_anchor_by_a_standard_error():
    from scfm_adapt.model._perturbation import CORRECTION_GRID, choose_correction

    rng = np.random.default_rng(0)
    n, w = 30, len(CORRECTION_GRID)
    # every left-out unit's error falls with the share, most at 0.75: that share is kept
    clear = 1.0 + np.abs(np.asarray(CORRECTION_GRID) - 0.75)[None, :] + rng.normal(0, 0.01, (n, w))
    assert choose_correction(clear) == 0.75
    # a share that wins on average by less than its standard error: the anchor alone
    z = rng.normal(size=n)
    gain = 0.02 + 0.5 * (z - z.mean()) / z.std(ddof=1)  # mean 0.02, standard error 0.09
    noisy = np.full((n, w), 1.5)
    noisy[:, 0], noisy[:, 2] = 1.0, 1.0 - gain
    assert gain.mean() > 0 and gain.mean() < gain.std(ddof=1) / np.sqrt(n)
    assert choose_correction(noisy) == 0.0
    assert choose_correction(clear[:1]) == 0.0  # one left-out unit tells nothing


def test_the_guidance_scale_is_the_one_whose_best_share_errs_least_out_of_bag():
    from scfm_adapt.model._perturbation import CORRECTION_GRID, choose_guidance

    rng = np.random.default_rng(0)
    n, w = 30, len(CORRECTION_GRID)
    grid = (1.0, 2.0, 3.0)
    base = 1.0 + np.abs(np.asarray(CORRECTION_GRID) - 0.5)[None, :]
    errors = np.stack([base + 0.3, base - 0.2, base], 1) + rng.normal(0, 0.01, (n, 3, w))
    errors[:, :, 0] = 1.5  # share 0 (the anchor alone) is the same at every scale
    assert choose_guidance(errors, grid) == (2.0, 0.5)
    flat = np.full((n, 3, w), 1.0) + rng.normal(0, 0.01, (n, 3, w))
    assert choose_guidance(flat, grid) == (1.0, 0.0)  # nothing kept: the scale is moot
    assert choose_guidance(np.zeros((0, 3, w)), grid) == (1.0, 0.0)


def test_control_plus_change_at_dose_zero_gives_back_the_control_cells(untrained_anchor):
    m, a = untrained_anchor
    ctrl = control_cells(a, "ctx1")
    out = m.predict_perturbation(ctrl, "A", dose=0.0, covariates={"context": "ctx1"}, seed=0)
    # no latent shift: the decoded change is 0, so every cell keeps its own counts
    np.testing.assert_allclose(out.layers["scfm_expected"], ctrl.X.toarray(), atol=1e-4)
    assert np.array_equal(out.X.toarray(), ctrl.X.toarray())
    assert np.abs(out.varm["scfm_delta"].to_numpy()).max() < 1e-5
    moved = m.predict_perturbation(ctrl, "A", covariates={"context": "ctx1"}, seed=0)
    x = moved.X.toarray()
    assert (
        np.array_equal(x, np.round(x)) and x.min() >= 0 and not np.array_equal(x, ctrl.X.toarray())
    )
    with pytest.raises(ValueError, match="counts="):
        sfa.model.PerturbationModel(a, counts="decoder")


def test_an_untrained_expression_anchored_model_predicts_the_additive_baseline():
    import torch

    m, a = _anchored(head_steps=0, anchor="expression")
    ln = M.lognorm(a)
    cond, ctx = a.obs["condition"].to_numpy(), a.obs["context"].to_numpy()

    def shift(p):  # observed mean shift of log-normalised expression in ctx1
        return ln[(cond == p) & (ctx == "ctx1")].mean(0) - ln[
            (cond == "control") & (ctx == "ctx1")
        ].mean(0)

    additive = shift("A") + shift("B")
    req = m._encode_requests([(("A", "B"), (1.0, 1.0))])
    anchor = m.full_anchors_["expression"]
    got = anchor(torch.tensor([m.contexts_.index("ctx1")]), *req)[0].numpy()
    np.testing.assert_allclose(got, additive, atol=1e-4)
    # end to end: the predicted mean change of the held-out combination is the additive one
    ctrl = control_cells(a, "ctx1")
    out = m.predict_perturbation(ctrl, "A+B", covariates={"context": "ctx1"}, seed=0)
    pred = M.lognorm(out).mean(0) - M.lognorm(ctrl).mean(0)
    assert np.corrcoef(pred, additive)[0, 1] > 0.95
    assert np.abs(pred - additive).mean() < 0.25 * np.abs(additive).mean()
    # free of rounding, the log-normalised cells are the shipped baseline's cells exactly
    table = sfa.baselines.PerturbationTable(a, "condition", "control", ["context"])
    baseline = sfa.baselines.additive_delta(table, "A+B", "ctx1")
    np.testing.assert_allclose(baseline, additive, atol=1e-5)
    expected_cells = sfa.baselines.shifted_cells(M.lognorm(ctrl), baseline)
    np.testing.assert_allclose(out.layers["scfm_lognorm"], expected_cells, atol=2e-4)
    np.testing.assert_allclose(out.varm["scfm_delta"]["A+B"], baseline, atol=2e-4)
    with pytest.raises(ValueError, match="control_plus_change"):
        sfa.model.PerturbationModel(a, anchor="expression", counts="decoded")


def test_the_flow_response_starts_at_the_anchor_samples_by_seed_and_round_trips(tmp_path):
    untrained, a = _anchored(head_steps=0, anchor="expression", response="flow", emb_dim=16)
    assert isinstance(untrained.heads[0], sfa.module.ResponseFlow)
    ctrl = control_cells(a, "ctx1")
    cov = {"context": "ctx1"}
    # untrained: the flow moves nothing, so the cells are the additive baseline's
    out = untrained.predict_perturbation(ctrl, "A+B", covariates=cov, seed=0)
    table = sfa.baselines.PerturbationTable(a, "condition", "control", ["context"])
    baseline = sfa.baselines.additive_delta(table, "A+B", "ctx1")
    want = sfa.baselines.shifted_cells(M.lognorm(ctrl), baseline)
    np.testing.assert_allclose(out.layers["scfm_lognorm"], want, atol=2e-4)

    m, _ = _anchored(head_steps=80, anchor="expression", response="flow", emb_dim=16)
    m.correction_weights_ = [1.0] * len(m.heads)  # the flow's share, whatever was chosen
    one = m.predict_perturbation(ctrl, "A+B", covariates=cov, seed=0)
    same = m.predict_perturbation(ctrl, "B+A", covariates=cov, seed=0)
    other = m.predict_perturbation(ctrl, "A+B", covariates=cov, seed=1)
    np.testing.assert_allclose(one.layers["scfm_lognorm"], same.layers["scfm_lognorm"], atol=1e-5)
    assert not np.allclose(one.layers["scfm_lognorm"], other.layers["scfm_lognorm"])
    assert np.abs(one.layers["scfm_lognorm"] - want).max() > 1e-3  # trained: it moves
    # the flow reads the context and the parts by attention; its scale was chosen out of bag
    assert m.heads[0].n_contexts == len(m.contexts_) == 2 and m.heads[0].pool is not None
    assert m.guidance_ in sfa.model._perturbation.GUIDANCE_GRID
    assert all(h.guidance == m.guidance_ for h in m.heads)
    m.guidance_ = 2.0  # a scale other than the default survives the round trip
    for h in m.heads:
        h.guidance = 2.0
    one = m.predict_perturbation(ctrl, "A+B", covariates=cov, seed=0)
    m.save(tmp_path / "flow")
    m2 = sfa.model.PerturbationModel.load(tmp_path / "flow")
    assert m2.guidance_ == 2.0 and m2.heads[0].guidance == 2.0
    two = m2.predict_perturbation(ctrl, "A+B", covariates=cov, seed=0)
    np.testing.assert_allclose(one.layers["scfm_lognorm"], two.layers["scfm_lognorm"], atol=1e-5)
    with pytest.raises(ValueError, match="response="):
        sfa.model.PerturbationModel(a, response="dit")
    with pytest.raises(ValueError, match="part_pool="):
        sfa.model.PerturbationModel(a, part_pool="max")


def _flow_on(stage: str, flow_init: str = "auto", head_steps: int = 0):
    import scvi

    scvi.settings.seed = 0
    a = make_perturbation_adata(n_genes=40)
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    m = sfa.model.PerturbationModel(
        a,
        gene_features=None,
        n_ensemble=2,
        n_tokens=4,
        token_dim=8,
        dit_hidden=16,
        dit_depth=1,
        gene_likelihood="poisson",
        response="flow",
        flow_init=flow_init,
    )
    m.train(
        max_epochs=3,
        head_steps=head_steps,
        progress=False,
        calibration_cells=16,
        stage=stage,
        prior_steps=8,
    )
    return m, a


def test_a_flow_starts_from_the_backbones_prior_where_it_has_one(tmp_path):
    """``flow_init="auto"``: with a trained prior (the backbone trained with
    ``stage="both"``) each member's DiT starts as a copy of it, and the untrained model
    still predicts the anchor; a save keeps that structure; ``"prior"`` without a prior
    is a named error."""
    m, a = _flow_on("both")
    assert m.flow_prior_ and "prior" in m.backbone.trained_stages_
    prior = m.backbone.module.dit_ema
    for h in m.heads:
        assert torch_equal(h.dit.blocks[0].adaLN[1].weight, prior.blocks[0].adaLN[1].weight)
        assert h.dit.x_embed.out_features == 16
    ctrl = control_cells(a, "ctx1")
    cov = {"context": "ctx1"}
    out = m.predict_perturbation(ctrl, "A+B", covariates=cov, seed=0)
    table = sfa.baselines.PerturbationTable(a, "condition", "control", ["context"])
    want = sfa.baselines.shifted_cells(
        M.lognorm(ctrl), sfa.baselines.additive_delta(table, "A+B", "ctx1")
    )
    np.testing.assert_allclose(out.layers["scfm_lognorm"], want, atol=2e-4)
    m.save(tmp_path / "m")
    m2 = sfa.model.PerturbationModel.load(tmp_path / "m")
    assert m2.flow_prior_
    two = m2.predict_perturbation(ctrl, "A+B", covariates=cov, seed=0)
    np.testing.assert_allclose(out.layers["scfm_lognorm"], two.layers["scfm_lognorm"], atol=1e-5)
    scratch, _ = _flow_on("both", flow_init="scratch")
    assert not scratch.flow_prior_ and scratch.heads[0].dit.x_embed.out_features == 64
    with pytest.raises(ValueError, match="trained prior"):
        _flow_on("vae", flow_init="prior")
    with pytest.raises(ValueError, match="flow_init="):
        sfa.model.PerturbationModel(a, flow_init="pretrained")


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_the_arithmetic_rule_taken_in_the_latent_is_the_decoded_latent_arithmetic(tmp_path):
    """A part never perturbed in a context takes its shift from the other contexts: with
    ``arithmetic_space_ == "latent"`` as the decoded change of the latent arithmetic, while
    the parts perturbed in the context keep their expression shift."""
    import scvi
    import torch

    scvi.settings.seed = 0
    a = make_perturbation_adata(n_genes=40)
    cond, ctx = a.obs["condition"].to_numpy(), a.obs["context"].to_numpy()
    a = a[~(np.isin(cond, ["A", "A+B"]) & (ctx == "ctx1"))].copy()  # A never in ctx1
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    m = sfa.model.PerturbationModel(
        a,
        n_ensemble=2,
        hidden=16,
        n_tokens=4,
        token_dim=8,
        gene_likelihood="poisson",
        anchor="expression",
        gene_features=None,
    )
    m.train(max_epochs=5, head_steps=0, progress=False, calibration_cells=32)
    # chosen on left-out training contexts: every unit of a context whose parts were
    # perturbed in the other one (ctx0's B and C, ctx1's B and C) is scored in both spaces
    val = m.arithmetic_validation_
    assert m.arithmetic_space_ in ("expression", "latent")
    assert m.decoded_change_ in ("log_ratio", "counts")
    lengths = {len(val[k]) for k in ("units", "expression", "log_ratio", "counts")}
    assert lengths == {4}
    assert all(-1 <= r <= 1 for r in val["expression"] + val["log_ratio"] + val["counts"])

    ctrl = control_cells(a, "ctx1")
    cov = {"context": "ctx1"}
    ln_ctrl = torch.as_tensor(M.lognorm(ctrl))
    cells = m._encode_cells(ctrl)
    zs = m._std(cells["z"])
    lat = m.full_anchors_["latent"]
    c1 = torch.full((len(zs),), m.contexts_.index("ctx1"))

    def mean_at(z):
        return m._decode(m._unstd(z), cells["library"], cells["conditions"], False)[0]

    def ln_mean(z):
        mu = mean_at(z)
        return torch.log1p(mu / mu.sum(1, keepdim=True) * 1e4).mean(0)

    def request(name):
        parts = tuple(name.split("+"))
        return m._encode_requests([(parts, (1.0,) * len(parts))])

    m.arithmetic_space_ = "expression"  # the mean shift in expression: A's in ctx0
    out = m.predict_perturbation(ctrl, "A", covariates=cov, seed=0)
    want = m.full_anchors_["expression"](c1[:1], *request("A"))[0]
    np.testing.assert_allclose(out.varm["scfm_delta"]["A"], want.numpy(), atol=2e-4)

    m.arithmetic_space_, m.decoded_change_ = "latent", "log_ratio"
    out = m.predict_perturbation(ctrl, ["A", "A+B"], covariates=cov, seed=0)
    a_shift = m._anchor_shift(lat, *request("A"), c1, len(zs))
    change = ln_mean(zs + a_shift) - ln_mean(zs)
    np.testing.assert_allclose(out.varm["scfm_delta"]["A"], change.numpy(), atol=2e-4)
    assert not np.allclose(change.numpy(), want.numpy(), atol=1e-2)  # the spaces differ
    # A+B: B's own expression shift in ctx1, then A's decoded change from where B ends
    b_expr = m.full_anchors_["expression"](c1[:1], *request("B"))[0]
    b_lat = m._anchor_shift(lat, *request("B"), c1, len(zs))
    ab = b_expr + ln_mean(zs + b_lat + a_shift) - ln_mean(zs + b_lat)
    np.testing.assert_allclose(out.varm["scfm_delta"]["A+B"], ab.numpy(), atol=2e-4)
    lognorm = out[out.obs["condition"] == "A"].layers["scfm_lognorm"]
    np.testing.assert_allclose(lognorm.mean(0) - ln_ctrl.numpy().mean(0), change, atol=2e-4)

    # the change as counts: the decoded change of the means added to each cell's counts
    m.decoded_change_ = "counts"
    out = m.predict_perturbation(ctrl, ["A"], covariates=cov, seed=0)
    x = torch.as_tensor(ctrl.X.toarray())
    scale = 1e4 / x.sum(1, keepdim=True)
    moved = (x + mean_at(zs + a_shift) - mean_at(zs)).clamp(min=0)
    want_counts = torch.log1p(scale * moved).mean(0) - ln_ctrl.mean(0)
    np.testing.assert_allclose(out.varm["scfm_delta"]["A"], want_counts.numpy(), atol=2e-4)
    assert not np.allclose(want_counts.numpy(), change.numpy(), atol=1e-2)

    m.save(tmp_path / "latent_arith")
    m2 = sfa.model.PerturbationModel.load(tmp_path / "latent_arith")
    assert m2.arithmetic_space_ == "latent" and m2.arithmetic_validation_ == val
    assert m2.decoded_change_ == "counts"
    two = m2.predict_perturbation(ctrl, ["A"], covariates=cov, seed=0)
    np.testing.assert_allclose(two.layers["scfm_lognorm"], out.layers["scfm_lognorm"], atol=1e-5)


def test_calibration_refits_each_members_anchor_without_the_unit(untrained_anchor):
    """The intervals are calibrated with every member's anchors refitted without the
    calibration unit, so that, as for a new request, no member has seen it."""
    import torch

    m, _ = untrained_anchor
    reqs = [(tuple(p), tuple(d)) for _, p, d in m.units_]
    u_idx, u_feat, u_dose = m._encode_requests(reqs)
    u_ctx = m._context_index([c for c, _, _ in m.units_])
    shifts = torch.randn(len(reqs), 3)
    parts = list(m.vocab_)
    fit = (u_ctx, u_idx, u_feat, u_dose)
    i = next(j for j, (c, p, _) in enumerate(m.units_) if c == "ctx1" and list(p) == ["A"])
    k = next(k for k in range(len(m.heads)) if i not in m.oob_[k])  # a member that saw it
    ctx1, a = m.contexts_.index("ctx1"), m.vocab_["A"]
    seen, _ = m._fit_anchor(k, m.units_, *fit, shifts, parts)
    assert seen.context_known[ctx1, a] == 1
    refit, _ = m._fit_anchor(k, m.units_, *fit, shifts, parts, drop=i)
    assert refit.context_known[ctx1, a] == 0 and refit.part_known[a] == 1  # arithmetic
    ctx0 = next(j for j, (c, p, _) in enumerate(m.units_) if c == "ctx0" and list(p) == ["A"])
    req = (u_ctx[i : i + 1], u_idx[i : i + 1], u_feat[i : i + 1], u_dose[i : i + 1])
    if ctx0 not in m.oob_[k]:  # A's shift now comes from ctx0 alone
        torch.testing.assert_close(refit(*req)[0], shifts[ctx0])

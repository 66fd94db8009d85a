"""PerturbationModel, sfa.baselines, sfa.metrics of perturbations, GO gene features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scfm_adapt as sfa
from scfm_adapt import errors

B = sfa.baselines
M = sfa.metrics
D = sfa.data

# effects of the synthetic perturbations: gene blocks multiplied by 4 (A, B, D-like A)
EFFECTS = {"A": slice(0, 5), "B": slice(5, 10), "C": slice(10, 15)}


def make_perturbation_adata(n_per_group: int = 50, n_genes: int = 30, seed: int = 0):
    """Synthetic counts: two contexts; control, A, B, C, A+B (unit tests only)."""
    import anndata as ad
    from scipy import sparse

    rng = np.random.default_rng(seed)
    base = {"ctx0": rng.gamma(3.0, 1.0, n_genes), "ctx1": rng.gamma(3.0, 1.0, n_genes)}
    rows, obs = [], []
    for ctx, mu0 in base.items():
        for pert in ["control", "A", "B", "C", "A+B"]:
            mu = mu0.copy()
            for part in pert.split("+"):
                if part in EFFECTS:
                    mu[EFFECTS[part]] *= 4.0
            lib = rng.uniform(0.7, 1.4, (n_per_group, 1))
            rows.append(rng.poisson(mu[None, :] * lib * 10).astype(np.float32))
            obs += [(pert, ctx)] * n_per_group
    x = np.concatenate(rows)
    x[:, -1] += 1
    frame = pd.DataFrame(obs, columns=["condition", "context"])
    frame.index = [f"c{i}" for i in range(len(frame))]
    a = ad.AnnData(sparse.csr_matrix(x), obs=frame)
    a.var_names = [f"g{i}" for i in range(n_genes)]
    return a


def toy_features() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    f = pd.DataFrame(rng.normal(size=(5, 8)), index=["A", "B", "C", "D", "FAR"])
    f.loc["D"] = f.loc["A"] + 0.05 * rng.normal(size=8)  # D looks like A
    f.loc["FAR"] = 25.0 * rng.normal(size=8)
    return f.astype(np.float32)


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


def _ctrl(a, ctx="ctx0"):
    keep = (a.obs["condition"] == "control") & (a.obs["context"] == ctx)
    return a[keep.to_numpy()].copy()


# ------------------------------------------------------------------ model
def test_prediction_slots_and_shapes(pert_model):
    m, a = pert_model
    ctrl = _ctrl(a)
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
    ctrl = _ctrl(a)
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
    ctrl = _ctrl(a)
    ab = m.predict_perturbation(ctrl, "A+B", seed=3)
    ba = m.predict_perturbation(ctrl, "B+A", seed=3)
    assert np.array_equal(ab.X.toarray(), ba.X.toarray())
    assert np.allclose(ab.varm["scfm_delta"].to_numpy(), ba.varm["scfm_delta"].to_numpy())
    assert ba.obs["condition"].iloc[0] == "A+B"
    emb = m.get_perturbation_embedding(["A+B", "B+A", "A"])
    assert np.allclose(emb.iloc[0], emb.iloc[1]) and not np.allclose(emb.iloc[0], emb.iloc[2])


def test_reproducible_and_n_samples(pert_model):
    m, a = pert_model
    ctrl = _ctrl(a)
    one = m.predict_perturbation(ctrl, "B", seed=1, n_samples=7)
    two = m.predict_perturbation(ctrl, "B", seed=1, n_samples=7)
    other = m.predict_perturbation(ctrl, "B", seed=2, n_samples=7)
    assert one.n_obs == 7
    assert np.array_equal(one.X.toarray(), two.X.toarray())
    assert not np.array_equal(one.X.toarray(), other.X.toarray())


def test_unseen_gene_with_features_and_without(pert_model):
    m, a = pert_model
    ctrl = _ctrl(a)
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
    ctrl = _ctrl(a)
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
    ctrl = _ctrl(a)
    d0 = m.predict_perturbation(ctrl, "A", dose=0.0, seed=0).varm["scfm_delta"]["A"]
    d1 = m.predict_perturbation(ctrl, "A", dose=1.0, seed=0).varm["scfm_delta"]["A"]
    assert d1.iloc[0:5].mean() > d0.iloc[0:5].mean() + 0.2
    assert abs(d0.iloc[0:5].mean()) < 0.2  # dose 0 is no perturbation


def test_save_load_round_trip(pert_model, tmp_path):
    m, a = pert_model
    ctrl = _ctrl(a)
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
    ctrl = _ctrl(a, "ctx1")
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


# ------------------------------------------------------------------ metrics
def test_metrics_on_hand_computed_cases():
    ctrl = np.zeros((2, 4))
    true = np.array([[1.0, 2.0, -1.0, 0.0], [1.0, 2.0, -1.0, 0.0]])
    pred = np.array([[2.0, 4.0, -2.0, 0.0]])  # delta twice the truth: r = 1, cosine = 1
    assert M.pearson_delta(pred, true, ctrl) == pytest.approx(1.0)
    assert M.cosine_lfc(pred, true, ctrl) == pytest.approx(1.0)
    assert list(M.de_genes(true, ctrl, 2)) == [1, 0]
    # R² over the top-3 DE genes (ordered 1, 0, 2): true means (2, 1, -1), predicted (4, 2, -2)
    mt = np.array([2.0, 1.0, -1.0])
    mp = np.array([4.0, 2.0, -2.0])
    expected = 1 - ((mt - mp) ** 2).sum() / ((mt - mt.mean()) ** 2).sum()
    assert M.r2_means(pred, true, ctrl, top_k=3) == pytest.approx(expected)
    flipped = np.array([[1.0, -2.0, 1.0, 0.0]])
    assert M.sign_accuracy(flipped, true, ctrl, top_k=3) == pytest.approx(1 / 3)
    assert M.pearson_delta(flipped, true, ctrl, top_k=2) == pytest.approx(-1.0)
    assert np.isnan(M.cosine_lfc(ctrl, true, ctrl))  # no change: undefined


def test_rank_metric_exposes_identical_predictions():
    true = np.eye(4)
    assert np.allclose(M.rank_metric(true, true), 0.0)
    same = np.tile(np.full(4, 0.25), (4, 1))
    assert np.allclose(M.rank_metric(same, true), 0.5)
    swapped = true[[1, 0, 2, 3]]
    r = M.rank_metric(swapped, true)
    # e1 is strictly closer than its own e0, e2 and e3 tie with it: (1 + 2/2) / 3
    assert r[0] == pytest.approx(2 / 3) and r[2] == 0.0
    with pytest.raises(ValueError):
        M.rank_metric(true[:1], true[:1])


def test_energy_distance_and_lognorm():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 10))
    x = rng.normal(size=(100, 10))
    assert M.perturbation_energy_distance(x, x, ref) == pytest.approx(0.0, abs=1e-9)
    assert (
        M.perturbation_energy_distance(x + 2.0, x, ref)
        > M.perturbation_energy_distance(x + 0.5, x, ref)
        > 0
    )
    counts = np.array([[1.0, 3.0], [0.0, 2.0]])
    assert np.allclose(M.lognorm(counts), np.log1p(counts / counts.sum(1, keepdims=True) * 1e4))
    with pytest.raises(ValueError, match="non-negative"):
        M.lognorm(-counts)
    out = M.evaluate_unit(x + 0.1, x, x, reference=ref)
    assert set(out) == set(M.METRICS)


# ------------------------------------------------------------------ baselines
def _toy_table():
    import anndata as ad

    # genes: 4; library 10,000 per cell so log-normalised = log1p(counts)
    def cells(v, n=3):
        return np.tile(np.asarray(v, float), (n, 1))

    blocks = {
        ("control", "x"): [2500, 2500, 2500, 2500],
        ("A", "x"): [4000, 1000, 2500, 2500],
        ("control", "y"): [1000, 4000, 2500, 2500],
        ("A", "y"): [2500, 2500, 2500, 2500],
        ("B", "y"): [1000, 4000, 4000, 1000],
    }
    x = np.concatenate([cells(v) for v in blocks.values()])
    obs = pd.DataFrame(
        [k for k in blocks for _ in range(3)], columns=["perturbation", "ctx"], dtype=str
    )
    obs.index = obs.index.astype(str)
    a = ad.AnnData(x, obs=obs)
    a.var_names = [f"g{i}" for i in range(4)]
    return (
        a,
        B.PerturbationTable(a, "perturbation", "control", ["ctx"]),
        {k: np.log1p(np.asarray(v, float)) for k, v in blocks.items()},
    )


def test_canonical_names():
    assert D.canonical_perturbation("B+A", "ctrl") == "A+B"
    assert D.canonical_perturbation("A+ctrl", "ctrl") == "A"
    assert D.canonical_perturbation("ctrl", "ctrl") == "ctrl"
    assert D.split_perturbation(" B + A ", "ctrl") == ["A", "B"]


def test_shift_baselines_by_hand():
    _, table, m = _toy_table()
    d_ax = m[("A", "x")] - m[("control", "x")]
    d_ay = m[("A", "y")] - m[("control", "y")]
    d_by = m[("B", "y")] - m[("control", "y")]
    assert np.allclose(table.deltas[("x", "A")], d_ax)
    # mean shift: A in the *other* context
    assert np.allclose(B.mean_shift_delta(table, "A", "x"), d_ay)
    assert np.allclose(B.mean_shift_delta(table, "A", "z"), (d_ax + d_ay) / 2)
    # unseen elsewhere: the average of all units
    assert np.allclose(B.mean_shift_delta(table, "B", "y"), (d_ax + d_ay + d_by) / 3)
    # additive: own-context singles summed; a part unseen in the context is averaged
    assert np.allclose(B.additive_delta(table, "B+A", "y"), d_ay + d_by)
    assert np.allclose(B.additive_delta(table, "A+B", "x"), d_ax + d_by)
    ctrl = np.zeros((2, 4))
    assert np.allclose(B.shifted_cells(ctrl, d_ax), np.tile(d_ax, (2, 1)))


def test_linear_baseline_fits_training_units():
    _, table, _ = _toy_table()
    feats = pd.DataFrame(np.eye(2), index=["A", "B"])
    lin = B.LinearPCARidge(n_components=4, ridge=1e-6, pert_features=feats).fit(table)
    for (c, p), d in table.deltas.items():
        pred = lin.predict_delta(p, table.ctrl[c])
        assert np.corrcoef(pred, d)[0, 1] > 0.99, (c, p)
    # an unknown part contributes nothing beyond the context and the bias
    out = lin.predict_delta("Q", table.ctrl["x"])
    assert out.shape == (4,) and np.all(np.isfinite(out))


def test_scvi_latent_arithmetic_smoke():
    a = make_perturbation_adata(n_per_group=20)
    train = a[~((a.obs["condition"] == "A") & (a.obs["context"] == "ctx1")).to_numpy()].copy()
    arith = B.ScVILatentArithmetic("condition", "control", ["context"], max_epochs=3).fit(train)
    ctrl = _ctrl(a, "ctx1")
    out = arith.predict(ctrl, "A", "ctx1", output="sample", seed=0)
    assert out.shape == (ctrl.n_obs, a.n_vars) and np.isfinite(out).all()
    again = arith.predict(ctrl, "A", "ctx1", output="sample", seed=0)
    assert np.array_equal(out, again)
    mean = arith.predict(ctrl, "A", "ctx1", output="mean")
    assert not np.array_equal(out, mean)


# ------------------------------------------------------------------ real data
def test_go_gene_features_real(shared_data):
    f = sfa.datasets.go_gene_features(["MAP4K3", "MAP4K5", "HK2", "NOT_A_GENE"])
    assert list(f.index) == ["MAP4K3", "MAP4K5", "HK2"]
    assert np.allclose(np.linalg.norm(f.to_numpy(), axis=1), 1.0, atol=1e-5)
    v = f.to_numpy()
    assert v[0] @ v[1] > v[0] @ v[2]  # two MAP4 kinases are closer than a hexokinase


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
    out = m.predict_perturbation(_ctrl(a), "A+B", seed=0)
    assert out.shape == (20, 40) and "pretrained + lora" in repr(m)

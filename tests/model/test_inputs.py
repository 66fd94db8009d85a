"""The input-validation matrix: every public entry point against messy inputs.

Each case is either handled (the result is identical to that of the clean input, or at
least finite) or raises a documented error class whose message names the fix. A second
set of tests checks that no entry point changes the user's AnnData beyond the documented
slots.
"""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
from scipy import sparse

import scfm_adapt as sfa
from conftest import TINY, make_adata
from scfm_adapt.errors import (
    DuplicateNamesError,
    GeneMismatchError,
    InvalidCountsError,
    MissingKeyError,
    SCFMInputError,
    UnknownCategoryError,
)


def _dense(a):
    a.X = a.X.toarray()
    return a


def _set(i, j, value):
    def edit(a):
        a = _dense(a)
        a.X[i, j] = value
        return a

    return edit


def _astype(dtype, fmt="csr"):
    def edit(a):
        x = a.X.toarray().astype(dtype)
        a.X = {"csr": sparse.csr_matrix, "csc": sparse.csc_matrix, "dense": np.asarray}[fmt](x)
        return a

    return edit


def _relabel(key, old, new):
    def edit(a):
        a.obs[key] = a.obs[key].cat.rename_categories({old: new})
        return a

    return edit


def _drop_obs(key):
    def edit(a):
        del a.obs[key]
        return a

    return edit


def _zero_cells(a):
    a = _dense(a)
    a.X[:5] = 0
    return a


def _zero_genes(a):
    a = _dense(a)
    a.X[:, 3:6] = 0
    return a


def _dup(axis):
    def edit(a):
        names = list(getattr(a, f"{axis}_names"))
        names[1] = names[0]
        setattr(a, f"{axis}_names", names)
        return a

    return edit


def _extra_genes(a):
    extra = ad.AnnData(
        sparse.csr_matrix(np.ones((a.n_obs, 2), dtype=np.float32)),
        obs=a.obs[[]],
        var=pd.DataFrame(index=["geneX1", "geneX2"]),
    )
    return ad.concat([a, extra], axis=1, merge="first")


def _backed(a, tmp_path):
    f = tmp_path / "q.h5ad"
    a.write_h5ad(f)
    return ad.read_h5ad(f, backed="r")


SAME, FINITE = "same", "finite"
#: name -> (edit of a clean AnnData, expected): expected is SAME (results identical to the
#: clean input's), FINITE (handled, finite results) or (error class, regex of the message).
CASES = {
    "csr": (lambda a: a, SAME),
    "csc": (_astype(np.float32, "csc"), SAME),
    "dense": (_astype(np.float32, "dense"), SAME),
    "int32": (_astype(np.int32), SAME),
    "uint16": (_astype(np.uint16, "dense"), SAME),
    "int-valued float64": (_astype(np.float64), SAME),
    "view": ("view", SAME),
    "view of dense": ("view dense", SAME),
    "backed": ("backed", SAME),
    "genes permuted": (lambda a: a[:, a.var_names[::-1]].copy(), SAME),
    "all-zero cells": (_zero_cells, FINITE),
    "all-zero genes": (_zero_genes, FINITE),
    "float counts": (_set(0, 0, 0.5), (InvalidCountsError, "non-integer.*layer=")),
    "negative": (_set(2, 1, -1.0), (InvalidCountsError, "negative.*raw counts")),
    "NaN": (_set(0, 0, np.nan), (InvalidCountsError, "NaN.*Remove or fill")),
    "inf": (_set(0, 0, np.inf), (InvalidCountsError, "NaN or infinite")),
    "empty cells": (lambda a: a[:0].copy(), (InvalidCountsError, "empty.*at least one cell")),
    "empty genes": (lambda a: a[:, :0].copy(), (SCFMInputError, "genes|empty")),
    "genes missing": (lambda a: a[:, 2:].copy(), (GeneMismatchError, "2 of its 40.*align")),
    "genes extra": (_extra_genes, (GeneMismatchError, "2 are extra")),
    "duplicated var_names": (_dup("var"), (DuplicateNamesError, "var_names_make_unique")),
    "duplicated obs_names": (_dup("obs"), (DuplicateNamesError, "obs_names_make_unique")),
    "missing batch column": (_drop_obs("batch"), (MissingKeyError, "lacks \\['batch'\\]")),
    "unknown batch": (_relabel("batch", "b0", "b9"), (UnknownCategoryError, "b9.*relabel")),
    "unknown label": (
        _relabel("cell_type", "type0", "typeX"),
        (UnknownCategoryError, "typeX.*load_query_data"),
    ),
}


def _query(name, tmp_path):
    edit, _ = CASES[name]
    a = make_adata()
    if edit == "view":
        return a[:60]
    if edit == "view dense":
        return _dense(a)[:60]
    if edit == "backed":
        return _backed(a, tmp_path)
    return edit(a)


def _reference_rows(name, n):
    return slice(0, 60) if name.startswith("view") else slice(0, n)


def _seeded(fn):
    def call(*args):
        scvi.settings.seed = 0
        return fn(*args)

    return call


STOCHASTIC = {"posterior_predictive_sample", "get_reconstruction_error"}

#: SCFM entry points that take a foreign AnnData: name -> f(model, adata, checkpoint path)
SCFM_CALLS = {
    "get_latent_representation": lambda m, a, p: m.get_latent_representation(a),
    "get_normalized_expression": lambda m, a, p: m.get_normalized_expression(a, return_numpy=True),
    "posterior_predictive_sample": _seeded(lambda m, a, p: m.posterior_predictive_sample(a)),
    "get_reconstruction_error": _seeded(
        lambda m, a, p: np.array([m.get_reconstruction_error(a)["reconstruction_loss"]])
    ),
    "counterfactual": lambda m, a, p: m.counterfactual(a, {"batch": "b1"}, n_steps=4).X.toarray(),
    "load": lambda m, a, p: sfa.model.SCFM.load(p, adata=a).get_latent_representation(),
    "tl.embed": lambda m, a, p: (sfa.tl.embed(a, m), a.obsm["X_scfm"])[1],
}


@pytest.mark.parametrize("call", list(SCFM_CALLS))
@pytest.mark.parametrize("case", list(CASES))
def test_scfm_entry_points_handle_or_reject_each_input(tiny_saved, case, call, tmp_path):
    m, path = tiny_saved
    q = _query(case, tmp_path)
    fn = SCFM_CALLS[call]
    expected = CASES[case][1]
    if call == "load" and case in ("genes permuted", "view", "view of dense", "backed"):
        # load attaches the AnnData itself to the model: it must be in the model's gene
        # order and in memory; a view is copied (scvi-tools' rule for set-up data)
        expected = {
            "genes permuted": (GeneMismatchError, "another order.*adata\\[:, "),
            "backed": SAME,
            "view": (SCFMInputError, "is a view.*adata.copy\\(\\)"),
            "view of dense": (SCFMInputError, "is a view"),
        }[case]
    if call == "load" and case == "missing batch column":
        expected = (MissingKeyError, "'batch' is not a column of adata.obs")
    if isinstance(expected, tuple):
        with pytest.raises(expected[0], match=expected[1]):
            fn(m, q, path)
        return
    out = np.asarray(fn(m, q, path))
    assert np.isfinite(out).all()
    if call in STOCHASTIC or (call == "counterfactual" and case.startswith("view")):
        # one posterior sample, or noise drawn for the whole batch of cells: finite and
        # shaped, not identical
        assert out.shape[0] == (1 if call == "get_reconstruction_error" else q.n_obs)
        return
    if expected == SAME:
        ref = np.asarray(fn(m, make_adata(), path))
        np.testing.assert_array_equal(out, ref[_reference_rows(case, len(ref))])


SETUP_OK = {
    "csr",
    "csc",
    "dense",
    "int32",
    "uint16",
    "int-valued float64",
    "all-zero cells",
    "all-zero genes",
    "genes permuted",
    "genes missing",
    "genes extra",
    "unknown batch",
    "unknown label",
    "backed",
}


@pytest.mark.parametrize("case", list(CASES))
def test_setup_anndata_handles_or_rejects_each_input(case, tmp_path):
    q = _query(case, tmp_path)
    if case in SETUP_OK:
        sfa.model.SCFM.setup_anndata(q, batch_key="batch", labels_key="cell_type")
        return
    expected = CASES[case][1]
    if case == "missing batch column":
        expected = (MissingKeyError, "'batch' is not a column of adata.obs")
    if case.startswith("view"):
        expected = (SCFMInputError, "is a view.*adata.copy\\(\\)")
    with pytest.raises(expected[0], match=expected[1]):
        sfa.model.SCFM.setup_anndata(q, batch_key="batch", labels_key="cell_type")


@pytest.mark.parametrize("case", ["float counts", "negative", "NaN", "inf"])
def test_train_rechecks_counts_changed_after_setup(case, tmp_path):
    a = make_adata()
    sfa.model.SCFM.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    m = sfa.model.SCFM(a, **TINY)
    a.X = _query(case, tmp_path).X  # e.g. sc.pp.normalize_total after setup
    with pytest.raises(InvalidCountsError):
        m.train(max_epochs=1, enable_progress_bar=False)


def test_zero_cells_train_and_embed_finitely():
    a = _zero_cells(make_adata())
    sfa.model.SCFM.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    m = sfa.model.SCFM(a, **TINY)
    m.train(max_epochs=2, enable_progress_bar=False, early_stopping=False, batch_size=32)
    assert np.isfinite(m.get_latent_representation()).all()
    assert np.isfinite(m.get_normalized_expression(return_numpy=True)).all()


# ------------------------------------------------------------------ annotator
@pytest.fixture(scope="module")
def annotator(tiny_saved):
    backbone, _ = tiny_saved
    a = make_adata()
    sfa.model.CellAnnotator.setup_anndata(a, labels_key="cell_type")
    ann = sfa.model.CellAnnotator(a, backbone, strategy="linear_probe")
    ann.train(max_epochs=2, enable_progress_bar=False)
    return ann


ANNOTATOR_EXPECTED = {  # the annotator ignores obs (labels are predicted, batches unused)
    "missing batch column": SAME,
    "unknown batch": SAME,
    "unknown label": SAME,
}


@pytest.mark.parametrize("case", list(CASES))
def test_annotator_predict_handles_or_rejects_each_input(annotator, case, tmp_path):
    q = _query(case, tmp_path)
    expected = ANNOTATOR_EXPECTED.get(case, CASES[case][1])
    if case == "genes permuted":
        expected = (GeneMismatchError, "another order")
    if isinstance(expected, tuple):
        with pytest.raises(expected[0], match=expected[1]):
            annotator.predict(q, soft=True)
        return
    out = annotator.predict(q, soft=True).to_numpy()
    assert np.isfinite(out).all()
    if expected == SAME:
        ref = annotator.predict(make_adata(), soft=True).to_numpy()
        np.testing.assert_array_equal(out, ref[_reference_rows(case, len(ref))])


# ------------------------------------------------------------------ perturbation model
@pytest.fixture(scope="module")
def perturbation_model():
    scvi.settings.seed = 0
    a = make_adata()
    a.obs["condition"] = np.where(a.obs["cell_type"] == "type0", "A", "control")
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", batch_key="batch")
    pm = sfa.model.PerturbationModel(a, gene_features=None, n_ensemble=2, hidden=16, **TINY)
    pm.train(max_epochs=2, head_steps=10, progress=False, calibration_cells=16, batch_size=32)
    return pm


PERTURBATION_EXPECTED = {  # the model reads the counts and the batch, not the labels
    "unknown label": SAME,
    "genes permuted": (GeneMismatchError, "another order"),
    "empty cells": (SCFMInputError, "no cells"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_perturbation_predict_handles_or_rejects_each_input(perturbation_model, case, tmp_path):
    q = _query(case, tmp_path)
    expected = PERTURBATION_EXPECTED.get(case, CASES[case][1])

    def predict(data):
        return perturbation_model.predict_perturbation(data, "A", seed=0, n_samples=32)

    if isinstance(expected, tuple):
        with pytest.raises(expected[0], match=expected[1]):
            predict(q)
        return
    out = predict(q)
    assert np.isfinite(out.X.toarray()).all()
    assert np.isfinite(out.varm["scfm_delta"].to_numpy()).all()
    if expected == SAME and not case.startswith("view"):  # a view has other control cells
        ref = predict(make_adata())
        np.testing.assert_array_equal(out.X.toarray(), ref.X.toarray())
        np.testing.assert_array_equal(out.varm["scfm_delta"], ref.varm["scfm_delta"])


# ------------------------------------------------------------------ no mutation
def _snapshot(a):
    x = a.X[:] if a.isbacked else a.X
    return {
        "X": x.copy(),
        "obs": a.obs.copy(),
        "var": a.var.copy(),
        "layers": {k: v.copy() for k, v in a.layers.items()},
        "uns": copy.deepcopy(dict(a.uns)),
        "obsm": set(a.obsm),
    }


def _assert_unchanged(a, snap, new_obs=(), new_uns=(), new_obsm=()):
    x = a.X[:] if a.isbacked else a.X
    assert sparse.issparse(x) == sparse.issparse(snap["X"]) and x.dtype == snap["X"].dtype
    assert getattr(x, "format", None) == getattr(snap["X"], "format", None)
    diff = x != snap["X"]
    assert not (diff.nnz if sparse.issparse(diff) else diff.any())
    extra = [c for c in a.obs.columns if c not in snap["obs"].columns]
    assert all(any(c.startswith(p) for p in new_obs) for c in extra), extra
    pd.testing.assert_frame_equal(a.obs[snap["obs"].columns], snap["obs"])
    pd.testing.assert_frame_equal(a.var, snap["var"])
    assert set(a.layers) == set(snap["layers"])
    assert set(a.uns) - set(snap["uns"]) <= set(new_uns)
    assert set(a.obsm) - snap["obsm"] <= set(new_obsm)


SCVI_UNS = ("_scvi_uuid", "_scvi_manager_uuid")


@pytest.mark.parametrize("call", list(SCFM_CALLS))
@pytest.mark.parametrize("fmt", ["csr", "dense", "view"])
def test_entry_points_leave_the_users_anndata_unchanged(tiny_saved, call, fmt, tmp_path):
    m, path = tiny_saved
    if call == "load" and fmt == "view":
        pytest.skip("load refuses views (tested in the matrix)")
    q = make_adata() if fmt != "dense" else _astype(np.float32, "dense")(make_adata())
    q.layers["counts"] = q.X.copy()
    if fmt == "view":
        q = q[10:70]
    snap = _snapshot(q)
    SCFM_CALLS[call](m, q, path)
    if call == "load":  # documented: load sets the AnnData up, like setup_anndata
        _assert_unchanged(q, snap, new_obs=("_scvi_",), new_uns=SCVI_UNS)
    elif call == "tl.embed":  # documented: writes obsm["X_scfm"] and uns["X_scfm"]
        # (writing into a view makes it an AnnData of its own: anndata's rule, as in scanpy)
        _assert_unchanged(q, snap, new_obsm=("X_scfm",), new_uns=("X_scfm",))
    else:
        _assert_unchanged(q, snap)
        assert q.is_view == (fmt == "view")  # a view stays a view


def test_setup_train_and_tl_write_only_documented_slots(tiny_saved, annotator):
    m, _ = tiny_saved
    a = make_adata()
    a.layers["counts"] = a.X.copy()
    snap = _snapshot(a)
    sfa.model.SCFM.setup_anndata(a, layer="counts", batch_key="batch", labels_key="cell_type")
    model2 = sfa.model.SCFM(a, **TINY)
    model2.train(max_epochs=1, enable_progress_bar=False, early_stopping=False)
    _assert_unchanged(a, snap, new_obs=("_scvi_",), new_uns=SCVI_UNS)
    q = make_adata()
    snap = _snapshot(q)
    sfa.tl.embed(q, m)
    sfa.tl.annotate(q, annotator)
    _assert_unchanged(
        q,
        snap,
        new_obs=("scfm_",),
        new_uns=("X_scfm", "scfm_label"),
        new_obsm=("X_scfm", "scfm_label_probs"),
    )

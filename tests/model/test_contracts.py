"""One model contract: every model class sits on BaseModel, feature mixins use only what
BaseModel offers or what they declare, imports flow one way without cycles, and every
model resumes an interrupted training to the uninterrupted result."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch

import scfm_adapt as sfa
from conftest import REPO, Crash, CrashAfter, load_benchmark, make_adata
from scfm_adapt.model.base import BaseModel

MODEL_DIR = Path(sfa.__file__).parent / "model"


def _architecture():
    """``benchmarks/architecture.py``, the script that prints these figures."""
    return load_benchmark("architecture")


def _declared(cls) -> set[str]:
    """Attributes, methods and annotations of ``cls`` and every class it inherits."""
    names = set(dir(cls))
    for c in inspect.getmro(cls):
        names |= set(getattr(c, "__annotations__", {}))
    return names


def _self_uses(cls) -> set[str]:
    """Every ``self.<name>`` / ``cls.<name>`` in the class body of ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id in ("self", "cls")
    }


def _feature_mixins() -> list[type]:
    out = []
    for f in sorted(MODEL_DIR.glob("_*.py")):
        mod = importlib.import_module(f"scfm_adapt.model.{f.stem}")
        out += [
            c
            for name, c in vars(mod).items()
            if inspect.isclass(c) and name.endswith("Mixin") and c.__module__ == mod.__name__
        ]
    return out


def test_feature_mixins_use_only_the_base_and_what_they_declare():
    mixins = _feature_mixins()
    assert {m.__name__ for m in mixins} >= {
        "AdaptationMixin",
        "GenerationMixin",
        "MultimodalMixin",
        "QuantizationMixin",
        "QueryMappingMixin",
        "TokenizerMixin",
    }
    base = _declared(BaseModel)
    for mixin in mixins:
        undeclared = sorted(_self_uses(mixin) - _declared(mixin) - base)
        assert not undeclared, f"{mixin.__name__} uses {undeclared} without declaring them"


def test_the_contract_check_finds_an_undeclared_use():
    class LeakyMixin:
        def f(self):
            return self._generate_extra  # a GenerationMixin hook, not declared here

    assert "_generate_extra" in _self_uses(LeakyMixin) - _declared(LeakyMixin) - _declared(
        BaseModel
    )


def test_every_model_keeps_one_contract():
    for cls in (sfa.model.SCFM, sfa.model.CellAnnotator, sfa.model.PerturbationModel):
        assert issubclass(cls, BaseModel)
        assert cls.load.__func__ is BaseModel.load.__func__  # one load, through hooks
        for hook in ("_checkpoint_config", "_checkpoint_state", "_from_checkpoint", "_summary"):
            assert getattr(cls, hook) is not getattr(BaseModel, hook), (cls, hook)


def test_imports_have_no_cycles_and_flow_one_way():
    arch = _architecture()
    src = Path(sfa.__file__).parent
    graph = arch.import_graph(src)
    root = src.name
    graph = {k: {v for v in vs if v != root} for k, vs in graph.items() if k != root}
    assert arch.cycles(graph) == []
    assert arch.layer_violations(graph, src) == []
    assert arch.cross_calls(src) == []


def test_the_cycle_finder_finds_a_cycle():
    arch = _architecture()
    assert arch.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ------------------------------------------------------------------ resuming
FAST = {"enable_progress_bar": False, "batch_size": 32}


@pytest.fixture(scope="module")
def backbone(tiny_saved):
    return tiny_saved[0]


def _annotator(backbone, seed=0):
    scvi.settings.seed = seed
    a = make_adata(n_cells=128, seed=1)
    sfa.model.CellAnnotator.setup_anndata(a, labels_key="cell_type")
    return sfa.model.CellAnnotator(a, backbone, strategy="lora"), a


def test_interrupted_annotator_training_resumes_to_the_uninterrupted_result(backbone, tmp_path):
    fit = {"max_epochs": 5, "early_stopping": False, **FAST}
    full, a = _annotator(backbone)
    full.train(**fit)
    p_full = full.predict(a, soft=True).to_numpy()

    part, _ = _annotator(backbone)
    with pytest.raises(Crash):
        part.train(**fit, checkpoint_dir=tmp_path, callbacks=[CrashAfter(2)])
    assert (tmp_path / "annotator" / "fit" / "last.ckpt").exists()
    assert not (tmp_path / "annotator" / "fit" / "done.json").exists()
    with pytest.raises(FileExistsError, match="resume=True"):
        _annotator(backbone)[0].train(**fit, checkpoint_dir=tmp_path)

    resumed, _ = _annotator(backbone, seed=123)  # another seed: the checkpoint decides
    resumed.train(**fit, checkpoint_dir=tmp_path, resume=True)
    np.testing.assert_allclose(resumed.predict(a, soft=True).to_numpy(), p_full, rtol=1e-5)
    assert resumed.calibration_["temperature"] == pytest.approx(full.calibration_["temperature"])

    again, _ = _annotator(backbone, seed=7)  # a finished run is restored, not retrained
    again.train(**fit, checkpoint_dir=tmp_path, resume=True)
    np.testing.assert_allclose(again.predict(a, soft=True).to_numpy(), p_full, rtol=1e-5)


def _perturbation_model(seed=0):
    from conftest import make_perturbation_adata

    scvi.settings.seed = seed
    torch.manual_seed(seed)
    a = make_perturbation_adata(n_per_group=20, n_genes=20)
    sfa.model.PerturbationModel.setup_anndata(a, "condition", "control", covariate_keys=["context"])
    m = sfa.model.PerturbationModel(
        a, gene_features=None, n_ensemble=3, hidden=16, n_tokens=2, token_dim=4
    )
    return m, a


class _CrashInHead(Exception):
    pass


def test_interrupted_perturbation_training_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch
):
    fit = {"max_epochs": 3, "head_steps": 20, "progress": False, "calibration_cells": 16}
    full, a = _perturbation_model()
    full.train(**fit)
    ctrl = a[(a.obs["condition"] == "control").to_numpy()].copy()
    one = full.predict_perturbation(ctrl, ["A+B", "C"], seed=0)

    part, _ = _perturbation_model()
    fit_member = sfa.model.PerturbationModel._fit_member

    def crash_on_the_last_member(self, head, k, *args, **kwargs):
        if k == 2:
            raise _CrashInHead("interrupted while training the last response head")
        return fit_member(self, head, k, *args, **kwargs)

    monkeypatch.setattr(sfa.model.PerturbationModel, "_fit_member", crash_on_the_last_member)
    with pytest.raises(_CrashInHead):
        part.train(**fit, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    heads = tmp_path / "response_heads"
    assert (heads / "member0").exists() and (heads / "member1").exists()
    assert not (heads / "member2").exists()
    assert (tmp_path / "backbone" / "vae" / "done.json").exists()
    with pytest.raises(FileExistsError, match="resume=True"):
        _perturbation_model()[0].train(**fit, checkpoint_dir=tmp_path)

    trained_on_resume = []

    def count(self, head, k, *args, **kwargs):
        trained_on_resume.append(k)
        return fit_member(self, head, k, *args, **kwargs)

    monkeypatch.setattr(sfa.model.PerturbationModel, "_fit_member", count)
    resumed, _ = _perturbation_model(seed=123)
    resumed.train(**fit, checkpoint_dir=tmp_path, resume=True)
    assert trained_on_resume == [2]  # the finished heads are restored, not retrained
    two = resumed.predict_perturbation(ctrl, ["A+B", "C"], seed=0)
    np.testing.assert_allclose(two.varm["scfm_delta"], one.varm["scfm_delta"], atol=1e-6)
    np.testing.assert_allclose(
        two.varm["scfm_delta_upper"], one.varm["scfm_delta_upper"], atol=1e-6
    )
    np.testing.assert_array_equal(two.X.toarray(), one.X.toarray())

    # interrupted after the last head, while calibrating: every head is restored, and the
    # calibration draws what it draws after training (the random state saved with a head)
    trained_on_resume.clear()
    calibrate = sfa.model.PerturbationModel._calibrate

    def crash_in_calibration(self, *args, **kwargs):
        raise _CrashInHead("interrupted while calibrating")

    late = tmp_path / "late"
    monkeypatch.setattr(sfa.model.PerturbationModel, "_calibrate", crash_in_calibration)
    with pytest.raises(_CrashInHead):
        _perturbation_model()[0].train(**fit, checkpoint_dir=late)
    monkeypatch.setattr(sfa.model.PerturbationModel, "_calibrate", calibrate)
    trained_on_resume.clear()
    third, _ = _perturbation_model(seed=7)
    third.train(**fit, checkpoint_dir=late, resume=True)
    assert trained_on_resume == []
    assert third.calibration_ == full.calibration_
    three = third.predict_perturbation(ctrl, ["A+B", "C"], seed=0)
    np.testing.assert_array_equal(three.varm["scfm_delta_upper"], one.varm["scfm_delta_upper"])


# ------------------------------------------------------------------ earlier layouts
def test_a_perturbation_model_saved_in_the_two_folder_layout_still_loads(tmp_path):
    """Saved by scfm_adapt before the one save/load (commit 833184c): backbone/ and
    response/ folders; tests/fixtures/make_perturbation_two_folders.py wrote it."""
    from conftest import make_perturbation_adata

    src = REPO / "tests" / "fixtures" / "perturbation_two_folders"
    expected = json.loads((src.parent / "perturbation_two_folders_expected.json").read_text())
    a = make_perturbation_adata(n_per_group=20, n_genes=20)
    keep = ((a.obs["condition"] == "control") & (a.obs["context"] == "ctx0")).to_numpy()
    for data in (None, a):  # without data, as before, and onto its training AnnData
        m = sfa.model.PerturbationModel.load(src, adata=data)
        pred = m.predict_perturbation(a[keep].copy(), ["A", "A+B"], seed=0)
        np.testing.assert_allclose(pred.varm["scfm_delta"], expected["delta"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pred.varm["scfm_delta_upper"], expected["upper"], rtol=1e-5)
        assert float(pred.X.sum()) == expected["X_sum"]
    m.save(tmp_path / "now")  # saved again, it is one folder and loads without data
    assert (tmp_path / "now" / "config.json").exists()
    again = sfa.model.PerturbationModel.load(tmp_path / "now")
    pred2 = again.predict_perturbation(a[keep].copy(), ["A", "A+B"], seed=0)
    np.testing.assert_array_equal(pred2.X.toarray(), pred.X.toarray())

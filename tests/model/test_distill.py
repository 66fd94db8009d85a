"""Distillation of a trained SCFM into a smaller student, on a tiny synthetic AnnData."""

import copy
import warnings

import numpy as np
import pytest
import scvi
import torch
from scvi import REGISTRY_KEYS

import scfm_adapt as sfa
from conftest import TINY, make_adata
from scfm_adapt.errors import GeneMismatchError
from scfm_adapt.module import DistillationModule

STUDENT = {"encoder_hidden": 8, "encoder_depth": 1, "decoder_hidden": 16}
FIT = {"batch_size": 32, "enable_progress_bar": False}


def _n_params(model) -> int:
    return sum(p.numel() for p in model.module.parameters())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


@pytest.fixture(scope="module")
def pair():
    """A teacher trained on both stages, a snapshot of its weights, and its student."""
    scvi.settings.seed = 0
    adata = make_adata()
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    teacher = sfa.model.SCFM(adata, **TINY)
    teacher.train(max_epochs=3, early_stopping=False, **FIT)
    before = _state(teacher)
    grads = [p.requires_grad for p in teacher.module.parameters()]
    student = sfa.model.distill(teacher, max_epochs=20, early_stopping=False, **STUDENT, **FIT)
    return teacher, before, grads, student


def _latent_mse(a, b) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untrained-model warning
        za = a.get_latent_representation(return_tokens=True)
        zb = b.get_latent_representation(return_tokens=True)
    return float(((za - zb) ** 2).mean())


def test_student_is_smaller_with_the_teachers_latent_shape_and_prior(pair):
    teacher, _, _, student = pair
    assert isinstance(student, sfa.model.SCFM)
    assert _n_params(student) < _n_params(teacher)
    n_vae = lambda m: sum(
        p.numel() for part in (m.module.encoder, m.module.decoder) for p in part.parameters()
    )
    assert n_vae(student) < n_vae(teacher) / 2
    z = student.get_latent_representation(return_tokens=True)
    assert z.shape == teacher.get_latent_representation(return_tokens=True).shape
    assert student.trained_stages_ == ["vae", "prior"] and student.is_trained_
    for name in ("dit", "dit_ema"):
        s, t = getattr(student.module, name).state_dict(), getattr(teacher.module, name)
        for k, v in t.state_dict().items():
            torch.testing.assert_close(s[k], v)
    assert student.module.latent_scale == teacher.module.latent_scale
    assert student.registry_["setup_args"] == teacher.registry_["setup_args"]
    assert "width 8" in repr(student)


def test_teacher_is_left_untouched(pair):
    teacher, before, grads, _ = pair
    for k, v in teacher.module.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert [p.requires_grad for p in teacher.module.parameters()] == grads


def test_distillation_loss_falls(pair):
    h = pair[3].history["vae"]
    for key in ("elbo_train", "latent_mse_train", "decoder_kl_train", "elbo_validation"):
        curve = h[key].to_numpy(dtype=float).ravel()
        assert np.isfinite(curve).all()
        assert curve[-1] < curve[0], key
    assert {"latent_kl_train", "student_nll_train"} <= set(h)


def test_student_latent_agrees_with_teacher_better_than_untrained(pair):
    teacher, _, _, student = pair
    scvi.settings.seed = 0
    untrained = sfa.model.SCFM(teacher.adata, **{**TINY, **STUDENT})
    mse_student, mse_untrained = _latent_mse(student, teacher), _latent_mse(untrained, teacher)
    assert mse_student < 0.6 * mse_untrained, (mse_student, mse_untrained)


def test_student_reuses_the_teachers_split(pair):
    teacher, _, _, student = pair
    for which in ("train_indices", "validation_indices", "test_indices"):
        np.testing.assert_array_equal(
            np.sort(getattr(student, which)), np.sort(getattr(teacher, which))
        )


def test_student_save_load_round_trip(pair, tmp_path):
    _, _, _, student = pair
    path = student.save(tmp_path / "student")
    loaded = sfa.model.SCFM.load(path, adata=student.adata)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), student.get_latent_representation()
    )
    assert loaded.trained_stages_ == ["vae", "prior"]
    assert loaded.module.encoder.hidden == STUDENT["encoder_hidden"]
    assert list(loaded.history["vae"]["latent_mse_train"].to_numpy().ravel()) == pytest.approx(
        list(student.history["vae"]["latent_mse_train"].to_numpy().ravel())
    )


def test_distil_on_new_cells(pair):
    teacher = pair[0]
    query = make_adata(n_cells=64, seed=1)
    student = sfa.model.distill(teacher, query, max_epochs=1, **STUDENT, **FIT)
    assert student.adata is query and student.get_latent_representation().shape == (64, 16)
    mapping = lambda m: list(
        m.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
    )
    assert mapping(student) == mapping(teacher)


def test_untrained_teacher_and_wrong_genes_are_refused(adata, tiny_kwargs, pair):
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch")
    with pytest.raises(RuntimeError, match="teacher is not trained"):
        sfa.model.distill(sfa.model.SCFM(adata, **tiny_kwargs), max_epochs=1)
    with pytest.raises(GeneMismatchError):
        sfa.model.distill(pair[0], make_adata(n_genes=30), max_epochs=1)
    with pytest.raises(TypeError, match="must be an SCFM"):
        sfa.model.distill(pair[0].module)


def test_module_loss_vanishes_for_a_copy_of_the_teacher(pair):
    """Random tensors in, LossOutput out: a student identical to the teacher has zero gap."""
    teacher = pair[0].module
    module = DistillationModule(copy.deepcopy(teacher), copy.deepcopy(teacher)).eval()
    assert not any(p.requires_grad for p in module.teacher.parameters())
    x = torch.poisson(torch.full((5, teacher.n_input), 3.0))
    tensors = {
        REGISTRY_KEYS.X_KEY: x,
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(5, 1),
        REGISTRY_KEYS.LABELS_KEY: torch.zeros(5, 1),
    }
    _, _, out = module(tensors)
    m = out.extra_metrics
    assert m["latent_mse"] == 0 and float(m["latent_kl"]) == pytest.approx(0, abs=1e-5)
    assert float(m["decoder_kl"]) == pytest.approx(0, abs=1e-5)
    assert out.n_obs_minibatch == 5 and torch.isfinite(out.loss)
    module.train()
    assert not module.teacher.training and module.student.encoder.training
    with pytest.raises(ValueError, match="differ in token_dim"):
        small = sfa.module.SCFMModule(teacher.n_input, n_batch=2, n_tokens=4, token_dim=2)
        DistillationModule(copy.deepcopy(teacher), small)
    with pytest.raises(ValueError, match=">= 0"):
        DistillationModule(teacher, copy.deepcopy(teacher), nll_weight=-1.0)

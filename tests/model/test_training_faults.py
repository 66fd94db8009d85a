"""Training under faults: resuming an interrupted run, determinism under a seed, and the
divergence guard with gradient clipping on by default."""

from __future__ import annotations

import numpy as np
import pytest
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import scfm_adapt as sfa
from conftest import TINY, Crash, CrashAfter, make_adata
from scfm_adapt.errors import TrainingDivergedError

FIT = {"enable_progress_bar": False, "batch_size": 32, "early_stopping": True}


def _model(seed: int = 0):
    scvi.settings.seed = seed
    a = make_adata(n_cells=128)
    sfa.model.SCFM.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    return sfa.model.SCFM(a, **TINY), a


@pytest.mark.parametrize("stage, k", [("vae", 2), ("prior", 1)])
def test_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path, stage, k):
    epochs = {"max_epochs": 5, "max_epochs_prior": 4}
    full, _ = _model()
    full.train(**epochs, **FIT)
    z_full = full.get_latent_representation()
    gen_full = full.generate({"cell_type": "type1"}, n_samples=16, n_steps=5).X.toarray()

    part, _ = _model()
    crash = CrashAfter(k)
    # the crash callback joins the stage it interrupts only
    if stage == "vae":
        with pytest.raises(Crash):
            part.train(**epochs, **FIT, checkpoint_dir=tmp_path, callbacks=[crash])
    else:
        part.train(**epochs, **FIT, stage="vae", checkpoint_dir=tmp_path)
        with pytest.raises(Crash):
            part.train(**epochs, **FIT, stage="prior", checkpoint_dir=tmp_path, callbacks=[crash])
    assert (tmp_path / stage / "last.ckpt").exists() and not (
        tmp_path / stage / "done.json"
    ).exists()
    with pytest.raises(FileExistsError, match="resume=True"):
        _model()[0].train(**epochs, **FIT, checkpoint_dir=tmp_path)

    resumed, _ = _model(seed=123)  # another process, another seed: the checkpoint decides
    resumed.train(**epochs, **FIT, checkpoint_dir=tmp_path, resume=True)
    assert resumed.trained_stages_ == ["vae", "prior"]
    np.testing.assert_allclose(resumed.get_latent_representation(), z_full, rtol=1e-5, atol=1e-6)
    gen = resumed.generate({"cell_type": "type1"}, n_samples=16, n_steps=5).X.toarray()
    np.testing.assert_array_equal(gen, gen_full)
    assert len(resumed.history["vae"]["elbo_train"]) >= 1


def test_resume_needs_a_checkpoint_dir():
    m, _ = _model()
    with pytest.raises(ValueError, match="checkpoint_dir"):
        m.train(max_epochs=1, resume=True)


def test_same_seed_gives_bitwise_identical_embedding_and_generated_cells():
    out = []
    for _ in range(2):
        m, _ = _model(seed=7)
        m.train(max_epochs=3, **FIT)
        gen = m.generate({"cell_type": "type2"}, n_samples=20, n_steps=5, seed=1)
        out.append((m.get_latent_representation(), gen.X.toarray()))
    (z1, g1), (z2, g2) = out
    assert np.array_equal(z1, z2) and np.array_equal(g1, g2)
    m3, _ = _model(seed=8)
    m3.train(max_epochs=3, **FIT)
    assert not np.array_equal(m3.get_latent_representation(), z1)  # the seed matters


class _Poison(Callback):
    """Put a NaN into one weight before the step ``at`` (like an overflow would)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.module.px_r.data[0] = float("nan")


def test_nan_loss_stops_training_naming_epoch_step_and_fix():
    m, _ = _model()
    with pytest.raises(TrainingDivergedError) as info:
        m.train(max_epochs=5, **FIT, callbacks=[_Poison(at=9)])
    msg = str(info.value)
    # 128 cells, 90% train, batch 32: 4 steps per epoch, so step 9 is in epoch 2, batch 1
    assert "epoch 2, step 9 (batch 1 of the epoch)" in msg and "Lower the learning rate" in msg
    assert "stage 'vae'" in msg and not m.is_trained_


def test_inf_gradient_is_caught_before_the_step():
    m, _ = _model()

    class InfGrad(Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 3:
                pl_module.module.px_r.grad[0] = float("inf")

    before = {}

    class Keep(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                before.update(
                    {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}
                )

    with pytest.raises(TrainingDivergedError, match=r"gradient became NaN or infinite.*step 3"):
        m.train(max_epochs=5, **FIT, callbacks=[InfGrad(), Keep()])
    after = m.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step never happened
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_gradient_clipping_is_on_by_default_and_can_be_turned_off():
    seen = {}

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.setdefault("clip", []).append(trainer.gradient_clip_val)

    m, _ = _model()
    m.train(max_epochs=1, max_epochs_prior=1, **FIT, callbacks=[Spy()])
    assert seen["clip"] == [sfa.train.DEFAULT_GRADIENT_CLIP, sfa.train.PRIOR_GRADIENT_CLIP]
    assert seen["clip"] == [1000.0, 10.0]
    seen.clear()
    m.train(max_epochs=1, **FIT, stage="vae", callbacks=[Spy()], gradient_clip_val=None)
    assert seen["clip"] == [None]
    seen.clear()
    m.train(max_epochs=1, **FIT, callbacks=[Spy()], gradient_clip_val=5.0)
    assert seen["clip"] == [5.0, 5.0]

"""int8 dynamic quantization of a trained SCFM (``SCFM.quantize``) for CPU inference.

Thresholds were set from measurements on this fixture (three data seeds): per-cell cosine
similarity of the embeddings, median >= 0.9999 and min >= 0.9991; relative Frobenius error
<= 0.019; Pearson r of log normalized expression >= 0.9996 (the asserts leave a margin
below these). A randomly re-initialised
encoder gives a median cosine of -0.6 to 0.3 and a relative error above 1.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QLinear

import scfm_adapt as sfa
from conftest import TINY, make_adata, n_threads
from scfm_adapt.module import tuner_layers


def _train(seed: int = 0, **train_kwargs):
    import scvi

    scvi.settings.seed = seed
    torch.set_num_threads(n_threads())
    adata = make_adata(seed=seed)
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = sfa.model.SCFM(adata, **TINY)
    model.train(
        max_epochs=3, enable_progress_bar=False, early_stopping=False, batch_size=32, **train_kwargs
    )
    return model


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def models():
    """(float model, its embedding, expression and weights before quantize, quantized)."""
    model = _train()
    z = model.get_latent_representation()
    expr = model.get_normalized_expression(return_numpy=True)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    return model, z, expr, state, model.quantize()


def test_quantized_embedding_close_to_float(models):
    _, z_float, _, _, q = models
    z = q.get_latent_representation()
    assert z.shape == z_float.shape and np.isfinite(z).all()
    cos = _cosine(z, z_float)
    assert np.median(cos) > 0.999 and cos.min() > 0.99
    assert np.linalg.norm(z - z_float) / np.linalg.norm(z_float) < 0.05
    assert not np.array_equal(z, z_float)  # int8 weights really changed the arithmetic


def test_float_model_untouched(models):
    model, z_float, expr_float, state, q = models
    assert not model.is_quantized_ and q.is_quantized_
    assert q is not model and q.module is not model.module and q.adata is model.adata
    linears = [m for m in model.module.modules() if type(m) is nn.Linear]
    assert linears and not any(isinstance(m, QLinear) for m in model.module.modules())
    after = model.module.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    np.testing.assert_array_equal(model.get_latent_representation(), z_float)
    np.testing.assert_array_equal(model.get_normalized_expression(return_numpy=True), expr_float)


def test_module_holds_quantized_linear_layers(models):
    model, _, _, _, q = models
    n_float = sum(type(m) is nn.Linear for m in model.module.modules())
    quantized = [m for m in q.module.modules() if isinstance(m, QLinear)]
    assert len(quantized) == n_float > 0
    assert not any(isinstance(m, nn.Linear) for m in q.module.modules())  # DiT included
    assert any(isinstance(m, QLinear) for m in q.module.encoder.modules())
    assert q.module.encoder.gene_to_tokens.weight().dtype == torch.qint8
    assert q.device == torch.device("cpu") and "int8" in repr(q)


def test_quantized_model_is_inference_only(models, tmp_path):
    model, _, _, _, q = models
    with pytest.raises(RuntimeError, match=r"inference only.*train\(\).*quantize\(\) again"):
        q.train(max_epochs=1)
    with pytest.raises(RuntimeError, match=r"inference only.*save\(\)"):
        q.save(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(RuntimeError, match="inference only"):
        q.adapt("lora", verbose=False)
    with pytest.raises(RuntimeError, match="quantized already"):
        q.quantize()
    with pytest.raises(RuntimeError, match="CPU only"):
        q.to_device("cuda:0")
    with pytest.raises(RuntimeError, match="quantized"):
        sfa.model.SCFM.trained_model(q)
    with pytest.raises(ValueError, match="int8"):
        model.quantize("int4")
    assert model.save(tmp_path / "float").is_dir()  # the float model still saves


def test_normalized_expression_close_to_float(models):
    _, _, expr_float, _, q = models
    expr = q.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    r = np.corrcoef(np.log(expr).ravel(), np.log(expr_float).ravel())[0, 1]
    assert r > 0.995


def test_generate_on_quantized_model(models):
    model, _, _, _, q = models
    kwargs = {"n_samples": 24, "n_steps": 5, "seed": 0, "library_size": 1000.0}
    a = model.generate(**kwargs).layers["scfm_expected"]
    b = q.generate(**kwargs).layers["scfm_expected"]
    a, b = (np.asarray(x.todense() if hasattr(x, "todense") else x) for x in (a, b))
    assert b.shape == a.shape and np.isfinite(b).all()
    assert np.corrcoef(np.log(a + 1e-8).ravel(), np.log(b + 1e-8).ravel())[0, 1] > 0.99


def test_quantize_silences_torch_deprecation_warnings(models):
    model = models[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = model.quantize()
        q.get_latent_representation(indices=np.arange(8))
    assert not [w for w in caught if "quantiz" in str(w.message)], caught


def test_untrained_model_refuses():
    adata = make_adata()
    sfa.model.SCFM.setup_anndata(adata)
    with pytest.raises(RuntimeError, match="Train the model before quantizing"):
        sfa.model.SCFM(adata, **TINY).quantize()


def test_active_lora_adapter_is_merged_into_the_quantized_copy():
    model = _train(stage="vae")
    model.adapt("lora", parts=("encoder", "decoder"), verbose=False)
    with torch.no_grad():  # a "trained" adapter: non-zero B, so it changes the outputs
        for name, p in model.module.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    z_lora = model.get_latent_representation()
    model.set_adapter(None)
    z_base = model.get_latent_representation()
    model.set_adapter("default")
    q = model.quantize()
    z = q.get_latent_representation()
    err = np.linalg.norm(z - z_lora) / np.linalg.norm(z_lora)
    assert err < 0.05 < np.linalg.norm(z_base - z_lora) / np.linalg.norm(z_lora)
    assert not tuner_layers(q.module)  # LoRA folded in, wrappers gone, all int8
    assert not any(isinstance(m, nn.Linear) for m in q.module.modules())
    # the float model keeps its (unmerged) adapter
    assert tuner_layers(model.module) and not model.module.merged
    np.testing.assert_array_equal(model.get_latent_representation(), z_lora)
    with pytest.raises(RuntimeError, match="inference only"):
        q.set_adapter(None)

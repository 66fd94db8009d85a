"""Scale: backed (out-of-core) training, chunked inference to disk, DDP, train options."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pytest
import scvi
import torch

import scfm_adapt as sfa
from conftest import TINY, make_adata


def _setup(adata):
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")


@pytest.fixture
def backed(adata, tmp_path):
    """The fixture's counts written to h5ad and opened backed (X stays on disk)."""
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)
    b = ad.read_h5ad(path, backed="r")
    assert b.isbacked and sfa.data.is_backed(b.X)
    yield b
    b.file.close()


def _first_train_batch(model) -> dict[str, torch.Tensor]:
    """The first training minibatch of scvi-tools' splitter, rows in a canonical order."""
    from scvi.dataloaders import DataSplitter

    scvi.settings.seed = 0
    splitter = DataSplitter(model.adata_manager, train_size=0.9, batch_size=32)
    splitter.setup()
    batch = next(iter(splitter.train_dataloader()))
    x = batch["X"].numpy()
    order = np.lexsort(x.T[::-1])  # backed loading sorts rows by index: undo either order
    return {k: v[torch.as_tensor(order)] for k, v in batch.items()}


def test_backed_and_in_memory_training_see_the_same_first_batch_and_loss(adata, backed):
    _setup(adata)
    _setup(backed)
    scvi.settings.seed = 0
    mem = sfa.model.SCFM(adata, **TINY)
    scvi.settings.seed = 0
    disk = sfa.model.SCFM(backed, **TINY)
    for a, b in zip(mem.module.state_dict().values(), disk.module.state_dict().values()):
        torch.testing.assert_close(a, b)
    # Gene shares and the library prior come from block-wise sums when backed.
    mem._fit_gene_frac()
    disk._fit_gene_frac()
    torch.testing.assert_close(mem.module.ref_gene_frac, disk.module.ref_gene_frac)
    torch.testing.assert_close(mem.module.decoder.lib_out.bias, disk.module.decoder.lib_out.bias)

    b_mem, b_disk = _first_train_batch(mem), _first_train_batch(disk)
    assert b_mem.keys() == b_disk.keys()
    for key in b_mem:
        torch.testing.assert_close(b_mem[key], b_disk[key])
    losses = []
    for model, batch in ((mem, b_mem), (disk, b_disk)):
        model.module.set_stage("vae")
        torch.manual_seed(1)
        _, _, loss = model.module(batch)
        losses.append(loss.loss.item())
    assert np.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_backed_training_trains_and_embeds(backed):
    _setup(backed)
    model = sfa.model.SCFM(backed, **TINY)
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    assert backed.isbacked and sfa.data.is_backed(backed.X)  # X was not swapped for memory
    hist = model.history["vae"]["elbo_train"].to_numpy(dtype=float).ravel()
    assert len(hist) == 2 and np.isfinite(hist).all()
    z = model.get_latent_representation()
    width = TINY["n_tokens"] * TINY["token_dim"]  # the tokens joined
    assert z.shape == (backed.n_obs, width) and np.isfinite(z).all()


def test_matrix_sums_match_in_memory_sums(adata, backed):
    rows, cols = sfa.data.matrix_sums(backed.X, block_size=7)
    x = adata.X.toarray()
    np.testing.assert_allclose(rows, x.sum(1))
    np.testing.assert_allclose(cols, x.sum(0))


def test_infer_to_disk_equals_in_memory_inference(trained, adata, backed, tmp_path):
    z = trained.get_latent_representation(adata)
    expr = trained.get_normalized_expression(adata, library_size=1e4, return_numpy=True)
    for source in (adata, backed):
        path = tmp_path / f"out_{source.isbacked}.h5ad"
        sfa.tl.infer_to_disk(
            source, trained, path, normalized=True, chunk_size=37, batch_size=16, progress=False
        )
        out = ad.read_h5ad(path)
        assert list(out.obs_names) == list(adata.obs_names)
        assert list(out.var_names) == trained.var_names_
        np.testing.assert_allclose(out.obsm["X_scfm"], z, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.X, expr, rtol=1e-5, atol=1e-4)
        assert out.uns["scfm_inference"]["params"]["chunk_size"] == 37
        assert not path.with_name(path.name + ".tmp").exists()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sfa.tl.infer_to_disk(adata, trained, path, progress=False)
    with pytest.raises(ValueError, match="Nothing to write"):
        sfa.tl.infer_to_disk(adata, trained, tmp_path / "x.h5ad", embedding=False)


def test_infer_to_disk_checks_genes_before_writing(trained, adata, tmp_path):
    bad = adata[:, 3:].copy()  # genes missing (another order is handled: model/test_inputs.py)
    with pytest.raises(sfa.errors.GeneMismatchError, match="3 of its 40 genes are missing"):
        sfa.tl.infer_to_disk(bad, trained, tmp_path / "bad.h5ad", progress=False)
    assert not list(tmp_path.iterdir())


def test_read_backed_concatenates_files_on_disk(adata, tmp_path):
    parts = [adata[:40].copy(), adata[40:].copy()]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"part{i}.h5ad")
        part.write_h5ad(paths[-1])
    joined = sfa.data.read_backed(paths, out=tmp_path / "joined.h5ad")
    assert joined.isbacked and joined.n_obs == adata.n_obs
    assert list(joined.obs["dataset"].unique()) == ["part0", "part1"]
    np.testing.assert_array_equal(joined.X[:].toarray(), adata.X.toarray())
    with pytest.raises(ValueError, match="need `out=`"):
        sfa.data.read_backed(paths)
    with pytest.raises(FileExistsError):
        sfa.data.read_backed(paths, out=tmp_path / "joined.h5ad")
    other = adata[:10, :20].copy()
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(ValueError, match="other genes"):
        sfa.data.read_backed([paths[0], tmp_path / "other.h5ad"], out=tmp_path / "x.h5ad")
    single = sfa.data.read_backed(paths[0])
    assert single.isbacked and single.n_obs == 40


def test_train_on_every_cell_without_validation(adata):
    _setup(adata)
    model = sfa.model.SCFM(adata, **TINY)
    model.train(max_epochs=2, train_size=1.0, batch_size=32, enable_progress_bar=False)
    assert model.trained_stages_ == ["vae", "prior"]
    assert "elbo_validation" not in model.history["vae"]
    assert len(model.history["vae"]["elbo_train"]) == 2


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, scvi
    sys.path.insert(0, {tests!r})
    from conftest import TINY, make_adata
    import scfm_adapt as sfa
    torch.set_num_threads(1)
    adata = make_adata(n_cells=256, n_genes=40)
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    scvi.settings.seed = 0
    model = sfa.model.SCFM(adata, **TINY)
    model.train(max_epochs={epochs}, batch_size=32, accelerator="cpu", devices=2,
                strategy="ddp", enable_progress_bar=False)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        model.save({out!r}, overwrite=True)
    """
)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_single_process(tmp_path):
    """Lightning's DDP (gloo, 2 processes): same model quality as one process."""
    from pathlib import Path

    epochs = 30
    script = tmp_path / "ddp_train.py"
    out = tmp_path / "ddp_model"
    script.write_text(
        _DDP_SCRIPT.format(tests=str(Path(__file__).parents[1]), epochs=epochs, out=str(out))
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    adata = make_adata(n_cells=256, n_genes=40)
    _setup(adata)
    ddp = sfa.model.SCFM.load(out, adata=adata)
    assert ddp.trained_stages_ == ["vae", "prior"]
    scvi.settings.seed = 0
    single = sfa.model.SCFM(adata, **TINY)
    untrained = single.get_reconstruction_error()["reconstruction_loss"]
    single.train(max_epochs=epochs, batch_size=32, enable_progress_bar=False)
    err_single = single.get_reconstruction_error()["reconstruction_loss"]
    err_ddp = ddp.get_reconstruction_error()["reconstruction_loss"]
    gain = untrained - err_single  # what single-process training achieved
    assert gain > 0.03 * untrained
    # DDP (each process half the cells, so half the optimizer steps) gets most of it.
    assert untrained - err_ddp > 0.5 * gain
    assert err_ddp == pytest.approx(err_single, rel=0.02)
    # The prior trained too: its EMA moved off its initial copy of the DiT weights.
    assert int(ddp.module.ema_steps) > 0


@pytest.mark.slow
def test_train_with_torch_compile(adata):
    _setup(adata)
    model = sfa.model.SCFM(adata, **TINY)
    model.train(max_epochs=1, batch_size=32, compile=True, enable_progress_bar=False)
    z = model.get_latent_representation()
    assert np.isfinite(z).all()
    assert set(model.module.state_dict()) == set(sfa.model.SCFM(adata, **TINY).module.state_dict())


@pytest.mark.gpu
def test_public_methods_on_gpu_with_bf16_and_pinned_memory(adata, tmp_path):
    _setup(adata)
    model = sfa.model.SCFM(adata, **TINY)
    model.train(
        max_epochs=2,
        batch_size=32,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        enable_progress_bar=False,
    )
    assert str(model.device).startswith("cuda")
    assert np.isfinite(model.get_latent_representation()).all()
    assert np.isfinite(model.get_normalized_expression(return_numpy=True)).all()
    assert model.posterior_predictive_sample().shape == adata.shape
    assert np.isfinite(model.get_reconstruction_error()["reconstruction_loss"])
    gen = model.generate(n_samples=16, n_steps=10)
    assert gen.n_obs == 16
    sfa.tl.infer_to_disk(adata, model, tmp_path / "gpu.h5ad", progress=False)
    z = model.get_latent_representation()
    cpu = sfa.model.SCFM.load(model.save(tmp_path / "m"), adata=adata, accelerator="cpu")
    np.testing.assert_allclose(cpu.get_latent_representation(), z, rtol=1e-3, atol=1e-4)


def test_interrupted_infer_to_disk_leaves_no_file_and_no_trust(
    trained, adata, tmp_path, monkeypatch
):
    calls = []
    real = trained.get_latent_representation

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trained, "get_latent_representation", flaky)
    path = tmp_path / "out.h5ad"
    with pytest.raises(KeyboardInterrupt):
        sfa.tl.infer_to_disk(adata, trained, path, chunk_size=40, progress=False)
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary
    other = adata.copy()
    sfa.tl.infer_to_disk(other, trained, path, chunk_size=40, progress=False)
    assert not trained._checked(other)  # the skip of the checks ended with the call


def test_backed_loader_reads_blocks_and_keeps_each_cell_with_its_fields(adata, backed):
    from scfm_adapt.data._block_loader import BlockDataset, BlockSampler

    _setup(adata)
    _setup(backed)
    disk = sfa.model.SCFM(backed, **TINY)
    # Small blocks and fetches: many fetches, each next one read by the prefetch thread.
    loader = disk._make_data_loader(
        adata=backed, batch_size=16, shuffle=True, block_size=4, fetch_size=32
    )
    assert isinstance(loader.dataset, BlockDataset)
    assert isinstance(loader.sampler, BlockSampler)
    batches = list(loader)
    got = np.concatenate(
        [np.hstack([b["X"].numpy(), b["batch"].numpy(), b["labels"].numpy()]) for b in batches]
    )
    manager = sfa.model.SCFM(adata, **TINY).adata_manager
    want = np.hstack(
        [
            adata.X.toarray(),
            manager.get_from_registry("batch"),
            manager.get_from_registry("labels"),
        ]
    )
    # Every cell exactly once per epoch, with its own batch and label.
    sort = lambda a: a[np.lexsort(a.T[::-1])]
    np.testing.assert_array_equal(sort(got), sort(want.astype(got.dtype)))
    assert loader.dataset._pool is not None  # the next fetches were read ahead
    # In memory it is scvi-tools' loader unchanged.
    mem = sfa.model.SCFM(adata, **TINY)._make_data_loader(adata=adata, batch_size=16)
    assert not isinstance(mem.dataset, BlockDataset)


def test_backed_inference_keeps_the_order_of_the_indices_asked_for(trained, adata, tmp_path):
    adata.write_h5ad(tmp_path / "a.h5ad")
    disk = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    idx = np.array([57, 3, 90, 3, 12, 80, 11])  # unsorted, one repeated
    np.testing.assert_allclose(
        trained.get_latent_representation(disk, indices=idx, batch_size=4),
        trained.get_latent_representation(adata, indices=idx, batch_size=4),
        rtol=1e-5,
        atol=1e-6,
    )
    disk.file.close()


def test_backed_shuffled_loading_reads_each_fetch_once_even_from_copied_items(adata, backed):
    """Worker processes get copies of the sampler's items: fetches are told apart by id,
    so each is read once (its next one by the prefetch thread), not once per minibatch.
    Training indices come shuffled from the splitter: the loader sorts them, so that a
    block is consecutive rows of the file."""
    import copy

    from scfm_adapt.data._block_loader import BlockAnnDataLoader

    _setup(backed)
    disk = sfa.model.SCFM(backed, **TINY)
    perm = np.random.default_rng(0).permutation(backed.n_obs)
    loader = BlockAnnDataLoader(
        disk.adata_manager, indices=perm, batch_size=8, shuffle=True, block_size=4, fetch_size=16
    )
    np.testing.assert_array_equal(loader.dataset.rows, np.sort(perm))
    reads = []
    real = loader.dataset._read_sorted
    loader.dataset._read_sorted = lambda pos: reads.append(len(pos)) or real(pos)
    items = [copy.deepcopy(item) for item in loader.sampler]
    seen = np.concatenate([loader.dataset[item]["X"] for item in items])
    assert len(reads) == len({item.fetch_id for item in items})  # one read per fetch
    assert seen.shape == (backed.n_obs, backed.n_vars)

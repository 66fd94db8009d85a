"""Checkpoints: format versions and migration, no unpickling, atomic saves that survive
interruption (in-process failures and a killed process), and damaged files refused."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import scfm_adapt as sfa
from conftest import REPO, TINY, make_adata
from scfm_adapt.errors import CheckpointError
from scfm_adapt.model.base import _checkpoint as _io

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_v1"


def _latent(model, adata):
    return model.get_latent_representation(adata)


def test_format_1_checkpoint_is_migrated_and_gives_its_recorded_embedding():
    """A checkpoint written by format 1 (commit 8035fbf) loads through the migration path
    and embeds cells exactly as it did when it was written."""
    expected = json.loads((REPO / "tests" / "fixtures" / "checkpoint_v1_expected.json").read_text())
    assert json.loads((FIXTURE / "config.json").read_text())["format_version"] == 1
    model = sfa.model.SCFM.load(FIXTURE)
    adata = make_adata(**expected["make_adata"])
    # recorded with the embedding of that release: the tokens averaged
    z = model.get_latent_representation(adata, pooling="mean")
    np.testing.assert_allclose(z[:8], np.asarray(expected["latent"]), rtol=1e-5, atol=1e-6)


def test_migration_path_and_version_errors(tmp_path):
    v1 = json.loads((FIXTURE / "config.json").read_text())
    v2 = _io.migrate_config(v1)
    assert v2["format_version"] == _io.FORMAT_VERSION == 2
    assert v2["files"]["model.safetensors"]["sha256"] == v1["weights"]["sha256"]
    assert "weights" not in v2 and "weights" in v1  # the input is not changed
    with pytest.raises(CheckpointError, match="Upgrade scfm_adapt"):
        _io.migrate_config({**v1, "format_version": _io.FORMAT_VERSION + 1})
    with pytest.raises(CheckpointError, match="cannot migrate"):
        _io.migrate_config({**v1, "format_version": 0})
    with pytest.raises(CheckpointError, match="Upgrade"):
        _io.migrate_config({**v1, "format_version": "2"})


def test_saved_config_has_version_and_manifest_of_every_file(trained, tmp_path):
    path = trained.save(tmp_path / "m", save_anndata=True)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format_version"] == _io.FORMAT_VERSION
    assert set(cfg["files"]) == {"model.safetensors", "adata.h5ad"}
    for name, rec in cfg["files"].items():
        assert (path / name).stat().st_size == rec["bytes"]
    (path / "adata.h5ad").write_bytes((path / "adata.h5ad").read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"adata.h5ad has .* truncated"):
        sfa.model.SCFM.load(path)


def test_every_save_writes_a_model_card_that_describes_the_model_and_its_data(trained, tmp_path):
    """README.md beside the weights: genes, the training data with its cell count and
    the checksum of its counts (the same for dense and sparse copies), covariates,
    likelihood, sizes, training time per stage, version and recorded evaluation; the
    card's record survives load and a second save, and editing the card (it is not in the
    checksum manifest) leaves the model loadable."""
    import scipy.sparse as sp

    from scfm_adapt.data import counts_sha256

    adata = make_adata()
    data = trained.card_["training_data"]
    assert [d["n_cells"] for d in data] == [adata.n_obs]
    assert data[0]["counts_sha256"] == counts_sha256(adata.X)
    dense = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    assert counts_sha256(dense) == counts_sha256(sp.csr_matrix(dense))
    changed = dense.copy()
    changed[0, 0] += 1
    assert counts_sha256(changed) != counts_sha256(dense)
    assert set(trained.card_["training_seconds"]) == {"vae", "prior"}
    trained.record_evaluation(knn_accuracy=0.875, note="toy data")
    with pytest.raises(TypeError, match="number or a string"):
        trained.record_evaluation(bad=[1, 2])
    path = trained.save(tmp_path / "m")
    card = (path / "README.md").read_text()
    assert f"# SCFM (scfm_adapt {sfa.__version__})" in card
    assert f"{adata.n_vars} genes, in this order" in card and str(adata.var_names[0]) in card
    assert f"| {adata.n_obs} | {adata.n_vars} | `{data[0]['counts_sha256'][:16]}` |" in card
    assert "`obs['batch']`" in card and "`obs['cell_type']`" in card
    assert f"likelihood: {trained.module.gene_likelihood.upper()}" in card
    n_weights = sum(v.numel() for v in trained.module.checkpoint_state().values())
    assert f"weights: {n_weights:,} numbers" in card
    assert "- vae: " in card and "- prior: " in card and "validation_loss" in card
    assert "| knn_accuracy | 0.875 |" in card and "| note | toy data |" in card
    again = sfa.model.SCFM.load(path).save(tmp_path / "again")
    assert (again / "README.md").read_text() == card
    # the card is for people: editing it (as on a model hub) leaves the model loadable
    (path / "README.md").write_text(card + "\nIntended use: PBMC data.\n")
    assert sfa.model.SCFM.load(path).card_["evaluation"]["knn_accuracy"] == 0.875


class _Payload:
    """Unpickling this creates the file ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickles_are_refused_never_run(trained, tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(marker))
    pickle.loads(blob)  # the payload works: unpickling it does run code
    assert marker.exists()
    marker.unlink()
    # 1. a folder holding only a pickle
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "model.pt").write_bytes(blob)
    with pytest.raises(CheckpointError, match="never loaded"):
        sfa.model.SCFM.load(evil)
    # 2. a real checkpoint whose weights were swapped for the pickle, with the config's
    #    manifest forged to match, so that the size and checksum checks pass
    path = trained.save(tmp_path / "m")
    (path / "model.safetensors").write_bytes(blob)
    _forge_manifest(path, "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        sfa.model.SCFM.load(path)
    # 3. a pickle beside a valid checkpoint is ignored, and loading works
    good = trained.save(tmp_path / "good")
    (good / "extra.pkl").write_bytes(blob)
    (good / "model.pt").write_bytes(blob)
    sfa.model.SCFM.load(good)
    assert not marker.exists()


def test_save_failing_after_moving_the_old_folder_aside_puts_it_back(
    trained, adata, tmp_path, monkeypatch
):
    path = trained.save(tmp_path / "m")
    before = _latent(sfa.model.SCFM.load(path), adata)
    real, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError("disk detached (simulated)")
        return real(src, dst)

    monkeypatch.setattr(_io.os, "replace", failing_replace)
    with torch.no_grad():
        trained.module.px_r.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        trained.save(path, overwrite=True)
    monkeypatch.setattr(_io.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    np.testing.assert_array_equal(_latent(sfa.model.SCFM.load(path), adata), before)


KILLED_SAVE = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from conftest import make_adata, TINY
    import scfm_adapt as sfa
    from scfm_adapt.model.base import _checkpoint as _io
    adata = make_adata()
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = sfa.model.SCFM(adata, **TINY)  # untrained weights differ from the saved ones
    real, calls = os.replace, []
    def dying_replace(src, dst):
        calls.append(src)
        if len(calls) == {n}:
            os._exit(9)  # the process dies here: no exception handler, no cleanup
        return real(src, dst)
    _io.os.replace = dying_replace
    model.save({path!r}, overwrite=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("die_at", [1, 2], ids=["before-any-rename", "between-renames"])
def test_save_killed_mid_way_leaves_the_previous_checkpoint_loadable(
    trained, adata, tmp_path, die_at
):
    path = trained.save(tmp_path / "m")
    before = _latent(sfa.model.SCFM.load(path), adata)
    code = KILLED_SAVE.format(tests=str(REPO / "tests"), n=die_at, path=str(path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir())
    if die_at == 2:
        assert "m" not in left and any(n.startswith(".m.old-") for n in left)
    # loading repairs an interrupted swap and gives the previous model
    np.testing.assert_array_equal(_latent(sfa.model.SCFM.load(path), adata), before)
    trained.save(path, overwrite=True)  # the next save cleans up what the dead one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: (p / "model.safetensors").write_bytes(b""), "truncated"),
        (lambda p: _truncate(p / "model.safetensors", 0.5), "truncated"),
        (lambda p: _flip_last_byte(p / "model.safetensors"), "SHA-256"),
        (lambda p: (p / "model.safetensors").unlink(), "missing"),
        (lambda p: _truncate(p / "config.json", 0.5), "not valid JSON"),
        (lambda p: (p / "config.json").write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), "not a checkpoint config"),
        (lambda p: _edit_config(p, lambda c: c.pop("files")), "manifest"),
        (lambda p: _edit_config(p, lambda c: c.update(files={"../x": {}})), "manifest"),
        (lambda p: _edit_config(p, lambda c: c.update(format_version=99)), "Upgrade"),
        (lambda p: _edit_config(p, lambda c: c.update(n=1), reseal=False), "own SHA-256"),
        (lambda p: _edit_config(p, lambda c: c["init_kwargs"].update(n_tokens=5)), "weights"),
    ],
    ids=[
        "weights-empty",
        "weights-half",
        "weights-bit-flip",
        "weights-missing",
        "config-half",
        "config-binary",
        "config-not-object",
        "manifest-missing",
        "manifest-bad",
        "future-format",
        "config-edited",
        "config-resealed-wrong-sizes",
    ],
)
def test_damaged_checkpoints_raise_checkpoint_error(trained, tmp_path, damage, match):
    path = trained.save(tmp_path / "m")
    damage(path)
    with pytest.raises(CheckpointError, match=match):
        sfa.model.SCFM.load(path)


def _truncate(f: Path, share: float) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * share)])


def _flip_last_byte(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def _edit_config(path: Path, edit, reseal: bool = True) -> None:
    """Edit the config; ``reseal`` recomputes its own checksum (as a forger would)."""
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    if reseal:
        cfg["config_sha256"] = _io._config_digest(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _forge_manifest(path: Path, name: str) -> None:
    """Record ``name``'s current size and SHA-256 in the manifest and reseal the config."""
    f = path / name
    _edit_config(path, lambda c: c["files"].update({name: _io._file_record(f)}))


def test_a_save_from_before_encoder_rank_loads_with_one_full_gene_map(tmp_path):
    """Sizes where the default rank factorises (8 tokens × 64 hidden, 300 genes): a config
    without ``encoder_rank`` (written before the option) must rebuild one full map."""
    adata = make_adata(n_cells=60, n_genes=300)
    sfa.model.SCFM.setup_anndata(adata)
    sizes = {**TINY, "n_tokens": 8, "encoder_hidden": 64}
    old = sfa.model.SCFM(adata, encoder_rank=None, **sizes)
    assert old.module.encoder.gene_down is None
    assert sfa.model.SCFM(adata, **sizes).module.encoder.gene_down is not None  # default
    path = old.save(tmp_path / "old")
    state, config = _io.read_checkpoint(path)
    del config["init_kwargs"]["encoder_rank"]
    loaded = sfa.model.SCFM._from_checkpoint(path, state, config, adata)
    assert loaded.module.encoder.gene_down is None
    np.testing.assert_allclose(
        loaded.get_latent_representation(), old.get_latent_representation(), atol=1e-6
    )
    # A new save records its rank, so it loads whatever the default.
    new = sfa.model.SCFM(adata, **sizes)
    again = sfa.model.SCFM.load(new.save(tmp_path / "new"), adata=adata)
    assert again.init_kwargs_["encoder_rank"] == 128
    assert again.module.encoder.gene_down.out_features == 128

"""Shared fixtures: a tiny synthetic AnnData (unit tests only) and the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lightning.pytorch.callbacks import Callback
from torch import nn

REPO = Path(__file__).parents[1]


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks are not a package);
    ``name`` may name a sub-folder (``"peers/score"``)."""
    import importlib.util

    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shared_data_dir() -> Path | None:
    """``$SCFM_ADAPT_DATA`` or ``../shared/data`` beside the repository, if it exists."""
    env = os.environ.get("SCFM_ADAPT_DATA")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    return p.resolve() if p.is_dir() else None


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def n_threads() -> int:
    """Torch threads for tests: ``$OMP_NUM_THREADS`` when set, else up to 2."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else min(2, os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    import scvi
    import torch

    scvi.settings.seed = 0
    torch.set_num_threads(n_threads())


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data absent: set $SCFM_ADAPT_DATA or provide ../shared/data")
    return d


def make_adata(n_cells: int = 96, n_genes: int = 40, seed: int = 0):
    """Synthetic NB counts with 3 cell types, 2 batches, a categorical and a continuous covariate.

    For unit tests only: real evaluation uses the data sets in ../shared/data.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n_cells)
    batch = rng.integers(0, 2, n_cells)
    programs = rng.gamma(2.0, 1.0, (3, n_genes))
    mu = programs[types] * (1 + 0.3 * batch)[:, None] * rng.uniform(0.5, 2, n_cells)[:, None]
    counts = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in types]),
            "batch": pd.Categorical([f"b{b}" for b in batch]),
            "donor_sex": pd.Categorical(rng.choice(["F", "M"], n_cells)),
            "age": rng.normal(50, 10, n_cells),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(sparse.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def adata():
    return make_adata()


TINY = {
    "n_tokens": 4,
    "token_dim": 4,
    "encoder_hidden": 16,
    "encoder_depth": 1,
    "n_heads": 2,
    "decoder_hidden": 32,
    "dit_hidden": 32,
    "dit_depth": 2,
    "dit_heads": 2,
    "n_diffusion_steps": 100,
}


class Crash(Exception):
    """An interruption raised by :class:`CrashAfter` (like a killed process)."""


class CrashAfter(Callback):
    """Raise :class:`Crash` after ``epoch`` has ended and been checkpointed (like a kill)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Crash(f"interrupted after epoch {self.epoch}")


@pytest.fixture
def tiny_kwargs() -> dict:
    return dict(TINY)


def train_tiny(adata, epochs: int):
    """A tiny SCFM (:data:`TINY`) set up on ``adata`` (batch, cell type) and trained both
    stages for ``epochs`` epochs, seed 0."""
    import scvi
    import torch

    import scfm_adapt as sfa

    torch.set_num_threads(n_threads())
    scvi.settings.seed = 0
    sfa.model.SCFM.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = sfa.model.SCFM(adata, **TINY)
    model.train(max_epochs=epochs, enable_progress_bar=False, early_stopping=False, batch_size=32)
    return model


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """A tiny SCFM trained 2 epochs on :func:`make_adata` and its saved folder, shared by
    the tests of one module: ``(model, path)``."""
    m = train_tiny(make_adata(), 2)
    return m, m.save(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="session")
def _trained_checkpoint(tmp_path_factory):
    """A tiny SCFM trained once per session (both stages, 3 epochs on :func:`make_adata`),
    saved: the ``trained`` fixture loads a fresh copy of it for each test."""
    return train_tiny(make_adata(), 3).save(tmp_path_factory.mktemp("trained") / "model")


@pytest.fixture
def trained(adata, _trained_checkpoint):
    """A trained tiny SCFM on this test's ``adata``, a model of its own (tests may adapt,
    train or quantize it): loaded from the session's checkpoint, not retrained."""
    import scvi

    import scfm_adapt as sfa

    model = sfa.model.SCFM.load(_trained_checkpoint, adata=adata)
    scvi.settings.seed = 0  # the same random state whichever test built the checkpoint
    return model


@pytest.fixture
def trained_in_memory(adata):
    """The ``trained`` recipe trained in this test, not loaded: for the tests of what
    training and saving themselves produce."""
    return train_tiny(adata, 3)


def pytest_terminal_summary(terminalreporter):
    """Print the fuzzing tally of tests/workflows/test_fuzz.py: examples and outcomes per
    entry point."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    counts = getattr(fuzz, "COUNTS", None)
    if not counts:
        return
    terminalreporter.section("fuzzing: examples per entry point and their outcomes")
    for entry, tally in sorted(counts.items()):
        outcomes = ", ".join(f"{k} {v}" for k, v in tally.most_common())
        terminalreporter.write_line(f"{entry}: {sum(tally.values())} examples ({outcomes})")
    total = sum(sum(t.values()) for t in counts.values())
    terminalreporter.write_line(f"total: {total} examples, no undocumented exception escaped")


# ------------------------------------------------------------------ perturbations
#: Effects of the synthetic perturbations: gene blocks multiplied by 4 (A, B, D-like A).
EFFECTS = {"A": slice(0, 5), "B": slice(5, 10), "C": slice(10, 15)}


class EncoderHost(nn.Module):
    """Stands in for the project's module in LoRA tests: the encoder lives at attribute
    ``encoder``, where the target names expect it."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(x)


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


def control_cells(a, ctx: str = "ctx0"):
    """The control cells of context ``ctx`` of :func:`make_perturbation_adata`, a copy."""
    keep = (a.obs["condition"] == "control") & (a.obs["context"] == ctx)
    return a[keep.to_numpy()].copy()


def write_panels(folder, n_cells=(30, 20, 25)):
    """Three files of toy counts measuring overlapping gene panels of gene0..gene39:
    0-29, 10-39 and every even gene, with a ``cell_type`` column."""
    panels = {
        "a": [f"gene{j}" for j in range(30)],
        "b": [f"gene{j}" for j in range(10, 40)],
        "c": [f"gene{j}" for j in range(0, 40, 2)],
    }
    paths, data = [], {}
    for seed, ((name, genes), n) in enumerate(zip(panels.items(), n_cells)):
        a = make_adata(n_cells=n, seed=seed)[:, genes].copy()
        a.obs = a.obs[["cell_type"]]
        path = folder / f"{name}.h5ad"
        a.write_h5ad(path)
        paths.append(path)
        data[name] = a
    return paths, data

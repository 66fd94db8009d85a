"""Throughput, memory, FLOPs and scaling of SCFM next to scVI, on one device in one run.

Sections (each model runs in a fresh process, one after another, so that timings are not
disturbed and each peak memory belongs to one run):

1. **Matmul peak** of this device (square fp32 and bf16 matmuls, median of repeats): the
   denominator of MFU.
2. **Real data** (Kang 2018 control PBMCs, 12,261 cells × 1,287 genes): training cells/s
   (fixed epochs, every cell, no validation or early stopping), embedding cells/s, peak
   memory, model FLOPs per cell (``torch.utils.flop_counter`` on one training step) and MFU,
   for scVI, SCFM defaults and a large SCFM configuration.
3. **Scaling** on synthetic NB counts with realistic sparsity, read from backed h5ad files:
   one VAE epoch and chunked embedding to disk at 10k → 100k → 1M cells (2,000 genes) and
   2,000 → 20,000 genes (10k cells): seconds, cells/s and peak memory at each size.

Usage::

    python benchmarks/throughput.py                       # everything (about 30 min, 2 CPU cores)
    python benchmarks/throughput.py --sections real       # one section
    python benchmarks/throughput.py --cells 10000 100000  # smaller scaling run
    python benchmarks/throughput.py --device cuda         # GPU: bf16-mixed for SCFM large
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    environment_info,
    fmt,
    markdown_table,
    peak_rss_mib,
    quiet,
    run_isolated,
    throughput,
    write_json,
)

RESULTS = Path(__file__).parent / "results"
LARGE = {
    "n_tokens": 16,
    "token_dim": 32,
    "encoder_hidden": 256,
    "encoder_depth": 4,
    "n_heads": 8,
    "decoder_hidden": 512,
    "dit_hidden": 512,
    "dit_depth": 8,
    "dit_heads": 8,
}
CONFIGS = {
    "scvi": None,
    "scfm": {},
    "scfm_full_map": {"encoder_rank": None},  # the gene map before issue 25
    "scfm_batch512": {},
    "scfm_large": LARGE,
    "scfm_large_compile": LARGE,
    "scfm_compile": {},
}
DEFAULT_MODELS = ["scvi", "scfm", "scfm_full_map", "scfm_batch512", "scfm_large"]
BATCH = {"scfm_batch512": 512}  # defaults to --batch-size
TRAIN_KW = {"scfm_large_compile": {"compile": True}, "scfm_compile": {"compile": True}}


# --------------------------------------------------------------------------- helpers
def _median_seconds(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(device: str) -> dict[str, float]:
    """Achieved TFLOP/s of a large square matmul in fp32 and bf16 on ``device``."""
    import torch

    n = 8192 if device == "cuda" else 2048
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        s = _median_seconds(lambda a=a, b=b: a @ b, 10 if device == "cuda" else 5, sync)
        out[name] = 2 * n**3 / s / 1e12
    return out


def _flops_per_cell(step, n_cells: int) -> float:
    """Matmul/attention FLOPs of ``step()`` (forward + backward) per cell."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / n_cells


def _first_batch(model, adata, batch_size: int):
    loader = model._make_data_loader(adata=adata, batch_size=batch_size, shuffle=True)
    dev = model.module.device
    return {k: v.to(dev) for k, v in next(iter(loader)).items()}


def _train_step_flops(model, adata, batch_size: int, stage: str | None) -> float:
    module = model.module
    if stage is not None:
        module.set_stage(stage)
    module.train()
    batch = _first_batch(model, adata, batch_size)

    def step():
        _, _, loss = module(batch)
        loss.loss.backward()
        module.zero_grad(set_to_none=True)

    return _flops_per_cell(step, batch_size)


def _embed_flops(model, adata, batch_size: int) -> float:
    import torch

    module = model.module
    module.eval()
    batch = _first_batch(model, adata, batch_size)

    def step():
        with torch.inference_mode():
            module.inference(**module._get_inference_input(batch))

    return _flops_per_cell(step, batch_size)


# --------------------------------------------------------------------------- workers
def worker_real(name: str, args) -> dict:
    """Train one configuration on Kang control PBMCs and time it (runs in its own process)."""
    import scvi
    import torch

    import scfm_adapt as sfa

    quiet()
    torch.set_num_threads(args.threads)
    adata = sfa.datasets.kang2018_ctrl()
    n = adata.n_obs
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    accel = "gpu" if args.device == "cuda" else "cpu"
    common = {
        "accelerator": accel,
        "devices": 1,
        "train_size": 1.0,
        "batch_size": BATCH.get(name, args.batch_size),
        "enable_progress_bar": False,
        "early_stopping": False,
    }
    large = name.startswith("scfm_large")
    epochs = args.epochs_large if large else args.epochs
    bf16 = (args.bf16 and name != "scvi") or (args.device == "cuda" and large)
    precision = "bf16-mixed" if bf16 else None
    if precision:
        common["precision"] = precision
    rec: dict = {"model": name, "n_cells": n, "n_genes": adata.n_vars, "epochs": epochs}
    rec["batch_size"] = common["batch_size"]
    scvi.settings.seed = 0
    if name == "scvi":
        scvi.model.SCVI.setup_anndata(adata)
        model = scvi.model.SCVI(adata)
        t = time.perf_counter()
        model.train(max_epochs=epochs, **common)
        sync()
        rec["train_s"] = time.perf_counter() - t
        rec["train_cells_per_s"] = throughput(epochs, n, rec["train_s"])
        rec["flops_train_cell"] = _train_step_flops(model, adata, args.batch_size, None)
    else:
        sfa.model.SCFM.setup_anndata(adata)
        model = sfa.model.SCFM(adata, **CONFIGS[name])
        rec["n_params"] = sum(p.numel() for p in model.module.parameters())
        total = 0.0
        for stage in ("vae", "prior"):
            t = time.perf_counter()
            model.train(max_epochs=epochs, stage=stage, **common, **TRAIN_KW.get(name, {}))
            sync()
            s = time.perf_counter() - t
            total += s
            rec[f"{stage}_s"] = s
            rec[f"{stage}_cells_per_s"] = throughput(epochs, n, s)
            rec[f"flops_{stage}_cell"] = _train_step_flops(
                model, adata, common["batch_size"], stage
            )
        model.module.set_stage("vae")
        rec["train_s"] = total
        # A "training epoch" of SCFM is one epoch of each stage: every cell passes twice.
        rec["train_cells_per_s"] = throughput(epochs, n, total)
    rec["flops_embed_cell"] = _embed_flops(model, adata, args.infer_batch_size)
    embed = lambda: model.get_latent_representation(batch_size=args.infer_batch_size)
    rec["embed_s"] = _median_seconds(embed, 3, sync)
    rec["embed_cells_per_s"] = throughput(1, n, rec["embed_s"])
    # At scvi-tools' inference batch (128), the default before issue 25.
    embed = lambda: model.get_latent_representation(batch_size=128)
    rec["embed128_cells_per_s"] = throughput(1, n, _median_seconds(embed, 3, sync))
    rec["peak_rss_mib"] = peak_rss_mib()
    if args.device == "cuda":
        rec["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return rec


def _write_h5ad(path: Path, chunks, obs, n_genes: int) -> int:
    """Write the CSR ``chunks`` (rows in order) and ``obs`` as a backed-ready h5ad, one
    chunk in memory at a time, atomically (a temporary file renamed); the number of
    non-zero counts written."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    tmp = path.with_name(path.name + ".tmp")
    nnz = 0
    with h5py.File(tmp, "w") as f:
        x = None
        for chunk in chunks:
            nnz += chunk.nnz
            if x is None:
                write_elem(f, "X", chunk)
                x = sparse_dataset(f["X"])
            else:
                x.append(chunk)
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    tmp.replace(path)
    ad.read_h5ad(path, backed="r").file.close()  # readable
    return nnz


def synthetic_h5ad(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> dict:
    """Write NB counts (10 cell types, log-normal gene means and depths) as a backed-ready
    h5ad, 20,000 cells at a time (never the whole matrix in memory)."""
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    base = rng.lognormal(-1.0, 2.2, n_genes)  # skewed gene means, as in scRNA-seq
    programs = base * rng.lognormal(0.0, 0.8, (10, n_genes))
    programs /= programs.sum(1, keepdims=True)
    # Counts per cell grow slowly with the genes kept (most counts fall on few genes):
    # about 2,500 at 2,000 genes and 5,600 at 20,000, so density falls with more genes.
    depth_mean = 2500 * (n_genes / 2000) ** 0.35
    theta = 2.0
    types = rng.integers(0, 10, n_cells)

    def chunks():
        for start in range(0, n_cells, 20_000):
            t = types[start : start + 20_000]
            depth = rng.lognormal(np.log(depth_mean), 0.5, len(t))
            mu = programs[t] * depth[:, None]
            counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
            yield sparse.csr_matrix(counts)

    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{i}" for i in types])},
        index=[f"c{i}" for i in range(n_cells)],
    )
    nnz = _write_h5ad(path, chunks(), obs, n_genes)
    return {"density": nnz / (n_cells * n_genes)}


def synthetic_h5ad_gib(path: Path, gib: float, n_genes: int, pool: int = 50_000) -> dict:
    """A backed-ready h5ad of at least ``gib`` GiB of counts: NB cells as in
    :func:`synthetic_h5ad` (a pool of ``pool`` of them), written 50,000 rows at a time,
    each row a random cell of the pool. The pool keeps writing I/O-bound; the rows are in
    random order, as an atlas concatenated from many files is not."""
    import anndata as ad
    import pandas as pd

    pool_path = path.with_name(path.stem + "_pool.h5ad")
    synthetic_h5ad(pool_path, pool, n_genes)
    cells = ad.read_h5ad(pool_path).X.tocsr()
    pool_path.unlink()
    bytes_per_cell = cells.nnz / pool * 12  # float32 values + int64 gene indices
    n_cells = int(math.ceil(gib * 2**30 / bytes_per_cell / 50_000) * 50_000)
    rng = np.random.default_rng(1)

    def chunks():
        for start in range(0, n_cells, 50_000):
            chunk = cells[rng.integers(0, pool, min(50_000, n_cells - start))]
            # int64 offsets: the whole file holds more than 2**31 values (set after
            # construction: scipy would pick int32 for one chunk).
            chunk.indptr = chunk.indptr.astype(np.int64)
            chunk.indices = chunk.indices.astype(np.int64)
            yield chunk

    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    nnz = _write_h5ad(path, chunks(), obs, n_genes)
    return {"n_cells": n_cells, "density": nnz / (n_cells * n_genes)}


def _vae_epoch_kwargs(args) -> dict:
    """``train`` arguments of one VAE epoch on every cell, no validation or early stop."""
    return {
        "max_epochs": 1,
        "stage": "vae",
        "train_size": 1.0,
        "batch_size": args.batch_size,
        "enable_progress_bar": False,
        "early_stopping": False,
        "accelerator": "gpu" if args.device == "cuda" else "cpu",
        "devices": 1,
    }


def _drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that a run starts cold."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def _step_clock():
    """A Lightning callback that records the time at the end of every training batch."""
    from lightning.pytorch import Callback

    class StepClock(Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_end(self, *args, **kwargs):
            self.times.append(time.perf_counter())

    return StepClock()


def worker_ooc(spec: str, args) -> dict:
    """Train the VAE stage of SCFM defaults for ``--ooc-seconds`` from the large file:
    ``memory`` (its first ``--ooc-memory-cells`` rows loaded into memory), ``backed`` (the
    whole file on disk, the package's block loader), ``backed_block<N>`` (the same with
    blocks of N rows) or ``backed_rows`` (scvi-tools' loader, one random row at a time).
    Steady-state cells/s counts the batches after the first quarter of the time."""
    import anndata as ad
    import torch
    from scvi.dataloaders import AnnDataLoader, DataSplitter

    import scfm_adapt as sfa

    mode, _, path = spec.partition(":")
    loader_kw = {}
    if mode.startswith("backed_block"):  # e.g. backed_block256: another block size
        loader_kw = {"block_size": int(mode.removeprefix("backed_block"))}
    quiet()
    torch.set_num_threads(args.threads)
    backed = ad.read_h5ad(path, backed="r")
    adata = ad.AnnData(backed.X[: args.ooc_memory_cells]) if mode == "memory" else backed
    rec = {"mode": mode, "n_cells": adata.n_obs, "n_genes": adata.n_vars}
    rec["file_gib"] = Path(path).stat().st_size / 2**30
    scfm = sfa.model.SCFM
    if mode == "backed_rows":  # scvi-tools' own loader and splitter
        scfm = type("SCFMRows", (sfa.model.SCFM,), {})
        scfm._data_loader_cls, scfm._data_splitter_cls = AnnDataLoader, DataSplitter
    t = time.perf_counter()
    scfm.setup_anndata(adata)
    model = scfm(adata)
    rec["setup_s"] = time.perf_counter() - t
    # The setup's count check read the whole file: empty the page cache again, so that
    # training starts with none of it in memory.
    rec["cold_start"] = _drop_page_cache()
    clock = _step_clock()
    t = time.perf_counter()
    model.train(
        **_vae_epoch_kwargs(args),
        max_time={"seconds": args.ooc_seconds},
        callbacks=[clock],
        datasplitter_kwargs=loader_kw,
    )
    rec["train_s"] = time.perf_counter() - t
    times = np.asarray(clock.times) - t
    steady = times[times > args.ooc_seconds / 4]
    if len(steady) < 2:  # an epoch shorter than the warm-up: every step counts
        steady = times
    rec["n_steps"] = len(times)
    rec["steady_cells_per_s"] = (len(steady) - 1) * args.batch_size / (steady[-1] - steady[0])
    rec["peak_rss_mib"] = peak_rss_mib()
    return rec


def worker_scale(path: str, args) -> dict:
    """One VAE epoch of SCFM defaults from a backed h5ad, then chunked embedding to disk."""
    import anndata as ad
    import torch

    import scfm_adapt as sfa

    quiet()
    torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(path, backed="r")
    rec = {"n_cells": adata.n_obs, "n_genes": adata.n_vars, "rss_after_open_mib": peak_rss_mib()}
    scfm = sfa.model.SCFM  # the lazy import of scvi-tools, outside the timing
    t = time.perf_counter()
    scfm.setup_anndata(adata)  # includes the count check, a block at a time
    rec["setup_s"] = time.perf_counter() - t
    model = scfm(adata)
    t = time.perf_counter()
    model.train(**_vae_epoch_kwargs(args))
    rec["epoch_s"] = time.perf_counter() - t
    rec["train_cells_per_s"] = throughput(1, adata.n_obs, rec["epoch_s"])
    rec["peak_rss_train_mib"] = peak_rss_mib()
    out = Path(path).with_name(Path(path).stem + "_scfm.h5ad")
    t = time.perf_counter()
    sfa.tl.infer_to_disk(
        adata,
        model,
        out,
        chunk_size=50_000,
        batch_size=args.infer_batch_size,
        overwrite=True,
        progress=False,
    )
    rec["embed_s"] = time.perf_counter() - t
    rec["embed_cells_per_s"] = throughput(1, adata.n_obs, rec["embed_s"])
    out.unlink()
    rec["peak_rss_mib"] = peak_rss_mib()
    return rec


def worker_steps(args) -> dict:
    """Median ms per training step of SCFM defaults, with Adam's per-parameter loop
    (PyTorch's CPU default, kept) and with its multi-tensor ``foreach`` kernels (tried after
    profiling showed the optimizer step at 16% of a VAE step; not kept: no steady gain)."""
    import torch

    import scfm_adapt as sfa

    quiet()
    torch.set_num_threads(args.threads)
    adata = sfa.datasets.kang2018_ctrl()
    sfa.model.SCFM.setup_anndata(adata)
    model = sfa.model.SCFM(adata)
    module = model.module
    rec = {}
    for bs in (128, 512):
        loader = model._make_data_loader(adata=adata, batch_size=bs, shuffle=True)
        batches = [b for _, b in zip(range(25), loader)]
        for stage in ("vae", "prior"):
            for foreach in (False, True):
                module.set_stage(stage)
                params = [p for p in module.parameters() if p.requires_grad]
                opt = torch.optim.Adam(params, lr=1e-5, foreach=foreach)
                times = []
                for i, b in enumerate(batches):
                    t = time.perf_counter()
                    _, _, loss = module(b)
                    opt.zero_grad()
                    loss.loss.backward()
                    opt.step()
                    if stage == "prior":
                        module.update_ema()
                    if i >= 5:
                        times.append(time.perf_counter() - t)
                rec[f"{stage}_b{bs}_{'foreach' if foreach else 'loop'}_ms"] = (
                    1e3 * statistics.median(times)
                )
    return rec


# --------------------------------------------------------------------------- report
def report_real(peak: dict, recs: dict) -> str:
    scvi = recs.get("scvi")
    rows = []
    for name, r in recs.items():
        train_flops = (
            r["flops_train_cell"]
            if name == "scvi"
            else r["flops_vae_cell"] + r["flops_prior_cell"]  # one pass of each stage
        )
        achieved = train_flops * r["train_cells_per_s"]
        key = "bf16" if r.get("precision_bf16") else "fp32"
        rows.append(
            [
                f"{name} (batch {r['batch_size']})",
                fmt(r.get("n_params"), ",.0f"),
                fmt(r["train_cells_per_s"], ",.0f"),
                f"{r['train_cells_per_s'] / scvi['train_cells_per_s']:.2f}x" if scvi else "n/a",
                fmt(r.get("vae_cells_per_s"), ",.0f"),
                fmt(r.get("prior_cells_per_s"), ",.0f"),
                fmt(r["embed_cells_per_s"], ",.0f"),
                f"{r['embed_cells_per_s'] / scvi['embed_cells_per_s']:.2f}x" if scvi else "n/a",
                fmt(r.get("embed128_cells_per_s"), ",.0f"),
                f"{train_flops / 1e6:.1f}",
                f"{r['flops_embed_cell'] / 1e6:.2f}",
                f"{100 * achieved / (peak[key] * 1e12):.1f}% ({key})",
                fmt(r["peak_rss_mib"], ",.0f"),
            ]
        )
    head = [
        "model",
        "params",
        "train cells/s",
        "× scVI",
        "VAE cells/s",
        "DiT cells/s",
        "embed cells/s",
        "× scVI",
        "embed cells/s at batch 128",
        "train MFLOP/cell",
        "embed MFLOP/cell",
        "train MFU",
        "peak RSS MiB",
    ]
    return markdown_table(head, rows)


def report_scale(recs: list[dict]) -> str:
    rows = [
        [
            f"{r['n_cells']:,} × {r['n_genes']:,}",
            f"{r['density']:.3f}",
            f"{r['file_mib']:,.0f}",
            f"{r['setup_s']:.1f}",
            f"{r['epoch_s']:.1f}",
            f"{r['epoch_s'] / r['n_cells'] * 1e6:.0f}",
            fmt(r["train_cells_per_s"], ",.0f"),
            fmt(r["embed_cells_per_s"], ",.0f"),
            fmt(r["peak_rss_mib"], ",.0f"),
        ]
        for r in recs
    ]
    head = [
        "cells × genes",
        "density",
        "h5ad MiB",
        "setup s",
        "VAE epoch s",
        "µs/cell",
        "train cells/s",
        "embed-to-disk cells/s",
        "peak RSS MiB",
    ]
    return markdown_table(head, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sections",
        nargs="+",
        default=["real", "steps", "scale"],
        choices=["real", "steps", "scale", "ooc"],
    )
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(CONFIGS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--epochs-large", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--infer-batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16-mixed for every SCFM run")
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--genes", type=int, nargs="+", default=[2_000, 5_000, 20_000])
    p.add_argument("--ooc-gib", type=float, default=30.0, help="size of the out-of-core file")
    p.add_argument("--ooc-seconds", type=float, default=180.0, help="training time per mode")
    p.add_argument("--ooc-memory-cells", type=int, default=200_000)
    p.add_argument("--ooc-modes", nargs="+", default=["memory", "backed", "backed_rows"])
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")))
    p.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        kind, _, what = args.worker.partition(":")
        if kind == "steps":
            rec = worker_steps(args)
        elif kind == "ooc":
            rec = worker_ooc(what, args)
        elif kind == "real":
            rec = worker_real(what, args)
        else:
            rec = worker_scale(what, args)
        if kind == "real":
            rec["precision_bf16"] = bool(
                (args.bf16 and what != "scvi")
                or (args.device == "cuda" and what.startswith("scfm_large"))
            )
        write_json(args.worker_out, rec)
        return

    import torch

    torch.set_num_threads(args.threads)
    env = environment_info()
    print(f"# Throughput benchmark ({args.device}, {args.threads} threads)\n")
    print(json.dumps(env))
    results: dict = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}}
    work = Path(args.cache) / "scfm_throughput"
    work.mkdir(parents=True, exist_ok=True)

    def isolated(spec: str) -> dict:
        out = work / (spec.replace(":", "_").replace("/", "_")[-80:] + ".json")
        out.unlink(missing_ok=True)
        passthrough = [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k
            in (
                "epochs",
                "epochs_large",
                "batch_size",
                "infer_batch_size",
                "threads",
                "ooc_seconds",
                "ooc_memory_cells",
            )
            or (k == "device")
        ]
        flags = ["--bf16"] if args.bf16 else []
        cmd = [sys.executable, __file__, "--worker", spec, "--worker-out", str(out)]
        return run_isolated([*cmd, *passthrough, *flags], out)

    peak = matmul_peak(args.device)
    results["matmul_peak_tflops"] = peak
    print(f"\nMatmul peak: fp32 {peak['fp32']:.3f} TFLOP/s, bf16 {peak['bf16']:.3f} TFLOP/s")

    if "real" in args.sections:
        recs = {}
        for name in args.models:
            recs[name] = isolated(f"real:{name}")
            print(f"  {name}: {json.dumps(recs[name])}", flush=True)
        results["real"] = recs
        print("\n## Kang 2018 control PBMCs (12,261 cells × 1,287 genes)\n")
        print(report_real(peak, recs))

    if "steps" in args.sections:
        rec = isolated("steps:")
        results["steps"] = rec
        rows = []
        for bs in (128, 512):
            for stage in ("vae", "prior"):
                loop, fe = rec[f"{stage}_b{bs}_loop_ms"], rec[f"{stage}_b{bs}_foreach_ms"]
                rows.append(
                    [f"{stage}, batch {bs}", f"{loop:.1f}", f"{fe:.1f}", f"{loop / fe:.2f}x"]
                )
        print("\n## Training step, SCFM defaults (median ms of 20 steps)\n")
        print(markdown_table(["stage", "loop (kept)", "foreach (tried)", "speed-up"], rows))

    if "scale" in args.sections:
        sizes = [(c, args.genes[0]) for c in args.cells]
        sizes += [(args.cells[0], g) for g in args.genes[1:]]
        recs = []
        for n_cells, n_genes in sizes:
            path = work / f"nb_{n_cells}x{n_genes}.h5ad"
            meta_path = path.with_suffix(".json")
            if not (path.exists() and meta_path.exists()):
                t = time.perf_counter()
                meta = synthetic_h5ad(path, n_cells, n_genes)
                meta["write_s"] = time.perf_counter() - t
                meta_path.write_text(json.dumps(meta))
            meta = json.loads(meta_path.read_text())
            rec = {**isolated(f"scale:{path}"), **meta, "file_mib": path.stat().st_size / 2**20}
            recs.append(rec)
            print(f"  {json.dumps(rec)}", flush=True)
        results["scale"] = recs
        print("\n## Scaling: SCFM defaults, one VAE epoch from a backed h5ad\n")
        print(report_scale(recs))

    if "ooc" in args.sections:
        path = work / f"nb_{args.ooc_gib:g}gib.h5ad"
        meta_path = path.with_suffix(".json")
        if not (path.exists() and meta_path.exists()):
            t = time.perf_counter()
            meta = synthetic_h5ad_gib(path, args.ooc_gib, args.genes[0])
            meta["write_s"] = time.perf_counter() - t
            meta_path.write_text(json.dumps(meta))
        meta = json.loads(meta_path.read_text())
        print(f"\nOut-of-core file: {json.dumps(meta)}", flush=True)
        recs = []
        for mode in args.ooc_modes:
            recs.append(isolated(f"ooc:{mode}:{path}"))
            print(f"  {json.dumps(recs[-1])}", flush=True)
        results["ooc"] = {"file": meta, "runs": recs}
        mem = next((r for r in recs if r["mode"] == "memory"), None)
        rows = [
            [
                r["mode"],
                f"{r['n_cells']:,}",
                f"{r['file_gib']:.1f}",
                f"{r['setup_s']:.0f}",
                f"{r['n_steps']:,}",
                fmt(r["steady_cells_per_s"], ",.0f"),
                f"{r['steady_cells_per_s'] / mem['steady_cells_per_s']:.2f}x" if mem else "n/a",
                "yes" if r["cold_start"] else "no",
                fmt(r["peak_rss_mib"], ",.0f"),
            ]
            for r in recs
        ]
        head = ["data", "cells", "file GiB", "setup s", "steps", "steady cells/s", "× memory"]
        head = [*head, "cold start"]
        print(f"\n## Out of core: VAE stage for {args.ooc_seconds:.0f} s\n")
        print(markdown_table([*head, "peak RSS MiB"], rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""What scGPT at its released sizes costs here: embedding speed and the weights that train.

A random checkpoint with the sizes of scGPT's released whole-human model (``embsize`` 512,
12 layers, 8 heads, ``d_hid`` 512, ``max_seq_len`` 1,200; :func:`scfm_adapt.data.
write_random_scgpt`), with the data set's genes as vocabulary, read through
``SCFM(tokenizer="scgpt")``. Random weights make the cost real and the quality meaningless,
so no quality figure is printed. The released vocabulary has about 60,000 genes; its
embedding table adds weights (``60,000 × 512``) but no work, because a cell reads only its
own genes' rows.

    python benchmarks/scgpt_cost.py [--dataset pbmc68k|kang] [--cells 256] [--repeats 3]

Prints the tokens per cell, the parameter counts (frozen backbone, LoRA r=8 on its four
targets) and the embedding throughput of ``get_latent_representation`` (median of the
repeats) at ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RELEASED = {"embsize": 512, "nlayers": 12, "nheads": 8, "d_hid": 512, "max_seq_len": 1200}


def load(name: str, n_cells: int):
    import scfm_adapt as sfa

    adata = sfa.datasets.pbmc68k() if name == "pbmc68k" else sfa.datasets.kang2018_ifnb()
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    return adata[keep].copy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="pbmc68k", choices=["pbmc68k", "kang"])
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import scfm_adapt as sfa

    adata = load(args.dataset, args.cells)
    with tempfile.TemporaryDirectory(prefix="scgpt_cost_") as tmp:
        folder = sfa.data.write_random_scgpt(Path(tmp) / "scgpt", adata.var_names, **RELEASED)
        sfa.model.SCFM.setup_anndata(adata)
        t0 = time.perf_counter()
        model = sfa.model.SCFM(adata, tokenizer="scgpt", backbone=folder)
        build_s = time.perf_counter() - t0
    enc = model.module.encoder
    x = adata.X
    nnz = np.diff(x.tocsr().indptr) if hasattr(x, "tocsr") else (np.asarray(x) > 0).sum(1)
    tokens = np.minimum(nnz, enc.max_len) + 1
    params = dict(model.module.named_parameters())
    backbone = [
        n for n in params if n.startswith("encoder.") and model.module._pretrained_external(n)
    ]
    frozen = sum(params[n].numel() for n in backbone)
    readout = sum(p.numel() for n, p in params.items() if n.startswith("encoder.")) - frozen
    model.adapt("lora", name="cost", parts=("encoder",), verbose=False)
    lora = sum(p.numel() for n, p in model.module.named_parameters() if "lora_" in n)
    model.set_adapter(None)
    model.get_latent_representation(batch_size=args.batch_size)  # warm-up
    secs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model.get_latent_representation(batch_size=args.batch_size)
        secs.append(time.perf_counter() - t0)
    med = statistics.median(secs)
    print(
        f"scGPT released sizes {RELEASED}, random weights; {args.dataset}: {adata.n_obs} cells, "
        f"{adata.n_vars} genes; torch {torch.__version__}, {args.threads} threads"
    )
    print(
        f"tokens/cell: mean {tokens.mean():.0f}, max {tokens.max()} (cap {enc.max_len + 1}); "
        f"build {build_s:.1f} s"
    )
    print(
        f"encoder weights: frozen backbone {frozen:,} (with this vocabulary of "
        f"{enc.config['vocab_size']:,} tokens), read-out {readout:,}; LoRA r=8 adds {lora:,}"
    )
    print(
        f"embed: {adata.n_obs / med:.1f} cells/s (median of {args.repeats}: "
        f"{', '.join(f'{s:.1f}' for s in secs)} s for {adata.n_obs} cells, batch "
        f"{args.batch_size})"
    )


if __name__ == "__main__":
    main()

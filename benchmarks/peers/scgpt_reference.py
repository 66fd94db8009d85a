"""scGPT's own code on given inputs: the reference of the scGPT backbone's fidelity test.

Runs in the ``scgpt`` venv (``benchmarks/peers/install.sh scgpt``), never in the project's.

    python scgpt_reference.py CHECKPOINT INPUTS.npz OUT.npz

``CHECKPOINT`` is an scGPT folder (``args.json``, ``vocab.json``, ``best_model.pt``).
``INPUTS.npz`` holds ``ids`` and ``values`` ``(B, L)`` with ``pad`` ``(B, L)`` bool (``True``
at padding, scGPT's ``src_key_padding_mask``), ``rows`` ``(R, G)`` of expression to bin, and
``cells`` ``(C, G)`` of expression with ``gene_ids`` ``(G,)`` (token ids, ``-1`` outside the
vocabulary). ``OUT.npz`` gets:

* ``hidden``: ``TransformerModel._encode`` ``(B, L, d)``, the model built from ``args.json``
  as scGPT's tutorials build it and loaded with scGPT's own key conversion for a model
  without flash-attn (``Wqkv.`` → ``in_proj_``, from ``scgpt.utils.load_pretrained``);
* ``bins``: ``scgpt.preprocess.binning`` of each row, ``draws`` times (``(draws, R, G)``,
  numpy seeds 0 ..), since scGPT draws a bin at random where bin edges tie;
* ``cell_emb``: scGPT's cell embedding of each cell ``(C, d)``, as ``scgpt.tasks.
  get_batch_cell_embeddings`` computes it: the cell's expressed vocabulary genes after
  ``<cls>`` (value ``pad_value``), binned and padded by scGPT's ``DataCollator``, through
  ``_encode``, the ``<cls>`` state L2-normalised (on the CPU, without autocast).

Only ``scgpt.model.model``, ``scgpt.preprocess`` and ``scgpt.data_collator`` are imported.
``scgpt/__init__.py`` imports its whole package (torchtext, scvi-tools < 1, wandb ...), which
does not install beside torch 2.13, so the package is entered through a bare module object
instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import torch


def _scgpt_modules():
    spec = importlib.util.find_spec("scgpt")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scgpt is not installed here: run benchmarks/peers/install.sh scgpt")
    root = Path(next(iter(spec.submodule_search_locations)))
    pkg = types.ModuleType("scgpt")
    pkg.__path__ = [str(root)]
    pkg.logger = logging.getLogger("scGPT")  # what scgpt/__init__.py defines and others use
    sys.modules["scgpt"] = pkg
    sub = types.ModuleType("scgpt.model")
    sub.__path__ = [str(root / "model")]
    sys.modules["scgpt.model"] = sub
    from scgpt.data_collator import DataCollator
    from scgpt.model.model import TransformerModel
    from scgpt.preprocess import binning

    return TransformerModel, binning, DataCollator


def embed_cells(model, DataCollator, data, cfg: dict, vocab: dict) -> np.ndarray:
    """scGPT's ``get_batch_cell_embeddings`` steps for ``data["cells"]``, on the CPU."""
    known = data["gene_ids"] >= 0
    gene_ids = data["gene_ids"][known]
    examples = []
    for row in data["cells"][:, known]:
        nz = np.nonzero(row)[0]
        genes = np.insert(gene_ids[nz], 0, vocab["<cls>"])
        values = np.insert(row[nz], 0, cfg["pad_value"])
        examples.append(
            {
                "genes": torch.from_numpy(genes).long(),
                "expressions": torch.from_numpy(values).float(),
            }
        )
    collator = DataCollator(
        do_padding=True,
        pad_token_id=vocab[cfg["pad_token"]],
        pad_value=cfg["pad_value"],
        do_mlm=False,
        do_binning=True,
        max_length=cfg["max_seq_len"],
        sampling=True,
        keep_first_n_tokens=1,
    )
    batch = collator(examples)
    with torch.no_grad():
        states = model._encode(
            batch["gene"],
            batch["expr"],
            src_key_padding_mask=batch["gene"].eq(vocab[cfg["pad_token"]]),
        )
    emb = states[:, 0, :].numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("inputs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args(argv)

    TransformerModel, binning, DataCollator = _scgpt_modules()
    cfg = json.loads((args.checkpoint / "args.json").read_text())
    vocab = json.loads((args.checkpoint / "vocab.json").read_text())
    state = torch.load(args.checkpoint / "best_model.pt", map_location="cpu", weights_only=True)
    state = {k.replace("Wqkv.", "in_proj_"): v for k, v in state.items()}
    style = cfg.get("input_emb_style", "continuous")
    n_input_bins = None
    if style == "category":
        n_input_bins = int(state["value_encoder.embedding.weight"].shape[0])
    model = TransformerModel(
        len(vocab),
        cfg["embsize"],
        cfg["nheads"],
        cfg["d_hid"],
        cfg["nlayers"],
        vocab=vocab,
        dropout=cfg["dropout"],
        pad_token=cfg["pad_token"],
        pad_value=cfg["pad_value"],
        input_emb_style=style,
        n_input_bins=n_input_bins,
        use_fast_transformer=False,
    )
    result = model.load_state_dict(state, strict=False)
    backbone = ("encoder.", "value_encoder.", "transformer_encoder.")
    not_loaded = [k for k in result.missing_keys if k.startswith(backbone)]
    if not_loaded:
        raise SystemExit(f"backbone tensors missing from the checkpoint: {not_loaded[:5]}")
    model.eval()

    data = np.load(args.inputs)
    with torch.no_grad():
        hidden = model._encode(
            torch.as_tensor(data["ids"], dtype=torch.long),
            torch.as_tensor(data["values"], dtype=torch.float32),
            src_key_padding_mask=torch.as_tensor(data["pad"], dtype=torch.bool),
        )
    rows = data["rows"]
    bins = np.zeros((args.draws, *rows.shape), dtype=np.int64)
    for s in range(args.draws):
        np.random.seed(s)  # noqa: NPY002 (scGPT draws from the legacy global generator)
        for r, row in enumerate(rows):
            bins[s, r] = binning(row, cfg["n_bins"])
    cell_emb = embed_cells(model, DataCollator, data, cfg, vocab)
    np.savez(args.out, hidden=hidden.numpy(), bins=bins, cell_emb=cell_emb)
    print(f"scgpt reference: hidden {tuple(hidden.shape)}, bins {bins.shape} -> {args.out}")


if __name__ == "__main__":
    main()

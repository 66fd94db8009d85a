"""scGPT checkpoints: the folder layout, its settings and random checkpoints for tests.

scGPT (Cui et al., Nature Methods 2024) ships a model as a folder of three files:

* ``args.json``: the training arguments, among them the sizes (``embsize``, ``nheads``,
  ``d_hid``, ``nlayers``), ``dropout``, the input (``input_style`` ``"binned"`` with
  ``n_bins``, ``input_emb_style``), the padding (``pad_token``, ``pad_value``) and
  ``max_seq_len``;
* ``vocab.json``: gene symbol (or special token ``<pad>``, ``<cls>``, ``<eoc>``) → token id;
* ``best_model.pt``: a torch state dict of its ``TransformerModel``: the gene encoder
  (``encoder.*``), the value encoder (``value_encoder.*``), the transformer
  (``transformer_encoder.layers.<i>.*``) and the pretraining heads (``decoder``,
  ``mvc_decoder``, ``cls_decoder`` ...), which a cell encoder does not need.

Models trained with flash-attn name each layer's packed query/key/value map
``self_attn.Wqkv``; those trained with torch's own layer name it ``self_attn.in_proj_*``.
Both hold the same matrix (queries, keys, values stacked), and :func:`load_scgpt` reads
either. The weights file is a pickle, so it is read with ``torch.load(weights_only=True)``,
which builds tensors only.

Nothing here imports torch at import time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ._checksums import file_sha256
from ._vocab import read_weights

PAD, CLS, EOC = "<pad>", "<cls>", "<eoc>"
_WEIGHT_FILES = ("best_model.pt", "model.pt", "model.safetensors")
#: Parts of scGPT's TransformerModel that read a cell: what a cell encoder keeps.
BACKBONE_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.layers.")
#: Parts that need a batch label per cell to encode; not supported.
_BATCH_PARTS = ("dsbn.", "bn.")
INPUT_STYLES = ("binned", "log1p", "normed_raw")
INPUT_EMB_STYLES = ("continuous", "category", "scaling")


@dataclass
class ScGPTCheckpoint:
    """An scGPT checkpoint read by :func:`load_scgpt`.

    Attributes
    ----------
    args
        ``args.json`` as written by scGPT.
    config
        What the encoder needs, normalised from ``args`` and the weights' shapes (see
        :func:`scgpt_config`).
    state_dict
        The backbone's tensors under scGPT's names, ``self_attn.in_proj_*`` renamed to
        ``self_attn.Wqkv.*``, without the pretraining heads.
    vocab
        Gene symbol (or special token) → token id.
    special
        Token ids of ``"pad"``, ``"cls"`` and ``"eoc"`` (``None`` when absent).
    source
        The checkpoint folder.
    sha256
        SHA-256 of the weights file, to record which weights an adapted model was built on.
    dropped
        Prefixes of the tensors left out (the pretraining heads), for the record.
    """

    args: dict
    config: dict
    state_dict: dict
    vocab: dict[str, int]
    special: dict[str, int | None]
    source: str
    sha256: str
    dropped: list[str]


def find_scgpt_files(path: str | os.PathLike) -> dict[str, Path]:
    """``{"args", "vocab", "weights"}`` → path in an scGPT checkpoint folder.

    Raises
    ------
    CheckpointError
        A file is missing; the message lists what the folder holds.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; pass the folder holding scGPT's args.json, vocab.json "
            "and best_model.pt (e.g. a local copy of the scGPT_human checkpoint)."
        )
    present = sorted(p.name for p in folder.iterdir())
    missing = [f"no {name}" for name in ("args.json", "vocab.json") if name not in present]
    weights = next((folder / w for w in _WEIGHT_FILES if (folder / w).is_file()), None)
    if weights is None:
        missing.append(f"no weights ({' or '.join(_WEIGHT_FILES)})")
    if missing:
        listing = f"found: {present[:20]}" if present else "the folder is empty"
        raise CheckpointError(
            f"Not an scGPT checkpoint: {'; '.join(missing)} in {folder} ({listing})."
        )
    return {"args": folder / "args.json", "vocab": folder / "vocab.json", "weights": weights}


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Cannot read {path} as JSON ({err}).") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}; expected {what}.")
    return obj


def backbone_state(state_dict: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """The tensors of scGPT's cell-reading parts, and the prefixes of those left out.

    ``self_attn.in_proj_weight`` / ``in_proj_bias`` (torch's layer) become
    ``self_attn.Wqkv.weight`` / ``.bias`` (flash-attn's name for the same matrix); a
    ``module.`` prefix (a model saved from inside DistributedDataParallel) is stripped.

    Raises
    ------
    CheckpointError
        The weights hold a batch-label normalisation (``dsbn``/``bn``), which a cell
        encoder without batch labels cannot apply.
    """
    out, dropped = {}, set()
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("transformer_encoder.fast_transformer_encoder."):
            raise CheckpointError(
                f"The weights hold {key!r}: this scGPT model uses linear attention "
                "(fast_transformer_backend='linear'), which is not supported; use a model "
                "trained with flash-attn or torch's attention (the released ones)."
            )
        if key.startswith(_BATCH_PARTS):
            raise CheckpointError(
                f"The weights hold {key!r}: this scGPT model was trained with batch "
                "normalisation of its input embeddings (domain_spec_batchnorm), which this "
                "encoder does not apply. Use a checkpoint trained without it (the released "
                "pretrained ones), or delete the dsbn.*/bn.* tensors from best_model.pt to "
                "encode without it, as scGPT's own embed_data does."
            )
        if not key.startswith(BACKBONE_PREFIXES):
            dropped.add(key.split(".")[0])
            continue
        key = key.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight")
        key = key.replace("self_attn.in_proj_bias", "self_attn.Wqkv.bias")
        out[key] = value
    return out, sorted(dropped)


def scgpt_config(
    args: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    where: str = "",
    torch_layer: bool = False,
) -> dict:
    """The encoder's settings from ``args.json`` and the backbone's tensors.

    Sizes come from the tensors where they show (vocabulary, width, layers, feed-forward,
    value bins), so that they cannot disagree with the weights; the head count, dropout
    and input settings from ``args`` (scGPT's defaults where absent). ``pre_norm`` holds
    only for layers saved with flash-attn: scGPT builds torch's post-norm layer otherwise
    (``torch_layer``, the ``self_attn.in_proj_*`` names), whatever ``args`` say.

    Raises
    ------
    CheckpointError
        Missing tensors, an unknown input style, or sizes that contradict ``args``.
    """
    where = where or "the checkpoint"
    emb = state_dict.get("encoder.embedding.weight")
    if emb is None:
        raise CheckpointError(
            f"{where} has no encoder.embedding.weight: not the state dict of scGPT's "
            "TransformerModel."
        )
    vocab_size, d_model = (int(s) for s in emb.shape)
    layers = sorted(
        {int(k.split(".")[2]) for k in state_dict if k.startswith("transformer_encoder.layers.")}
    )
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{where} has no transformer layers 0..n-1 (found {layers[:8]}).")
    linear1 = state_dict.get("transformer_encoder.layers.0.linear1.weight")
    if linear1 is None:
        raise CheckpointError(
            f"{where} has no transformer_encoder.layers.0.linear1.weight: not the state dict "
            "of scGPT's TransformerModel."
        )
    d_hid = int(linear1.shape[0])
    input_emb_style = str(args.get("input_emb_style", "continuous"))
    if input_emb_style not in INPUT_EMB_STYLES:
        raise CheckpointError(
            f"{where}: input_emb_style={input_emb_style!r}; expected one of {INPUT_EMB_STYLES}."
        )
    table = state_dict.get("value_encoder.embedding.weight")
    if (input_emb_style == "category") != (table is not None):
        raise CheckpointError(
            f"{where}: args.json says input_emb_style={input_emb_style!r}, but the weights "
            f"{'have no' if table is None else 'have a'} value embedding table "
            "(value_encoder.embedding); the args.json belongs to another model."
        )
    input_style = str(args.get("input_style", "binned"))
    if input_style not in INPUT_STYLES:
        raise CheckpointError(
            f"{where}: input_style={input_style!r}; expected one of {INPUT_STYLES}."
        )
    n_heads = int(args.get("nheads", args.get("nhead", 8)))
    for name, given, found in (
        ("embsize", args.get("embsize", d_model), d_model),
        ("nlayers", args.get("nlayers", len(layers)), len(layers)),
        ("d_hid", args.get("d_hid", d_hid), d_hid),
    ):
        if int(given) != found:
            raise CheckpointError(
                f"{where}: args.json says {name}={given} but the weights have {found}; the "
                "args.json belongs to another model."
            )
    if d_model % n_heads:
        raise CheckpointError(f"{where}: embsize={d_model} is not divisible by nheads={n_heads}.")
    n_input_bins = None if table is None else int(table.shape[0])
    return {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_hid": d_hid,
        "n_layers": len(layers),
        "dropout": float(args.get("dropout", 0.2)),
        "input_style": input_style,
        "input_emb_style": input_emb_style,
        "n_bins": int(args.get("n_bins", 51)),
        "n_input_bins": n_input_bins,
        "pad_value": float(args.get("pad_value", -2)),
        "max_seq_len": int(args.get("max_seq_len", 1200)),
        "pre_norm": bool(args.get("pre_norm", False)) and not torch_layer,
    }


def load_scgpt(path: str | os.PathLike) -> ScGPTCheckpoint:
    """Read an scGPT checkpoint folder (nothing is downloaded, nothing runs code).

    Parameters
    ----------
    path
        Local folder with ``args.json``, ``vocab.json`` and ``best_model.pt``, as released
        by scGPT (e.g. ``scGPT_human``) or saved by its fine-tuning scripts.

    Returns
    -------
    :class:`ScGPTCheckpoint`

    Raises
    ------
    CheckpointError
        Missing or unreadable files, a pickled model object instead of a state dict, an
        unsupported configuration, or a vocabulary that does not fit the weights.
    """
    files = find_scgpt_files(path)
    args = _read_json(files["args"], "scGPT's training arguments")
    vocab_raw = _read_json(files["vocab"], "a gene → token id mapping")
    try:
        vocab = {str(k): int(v) for k, v in vocab_raw.items()}
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{files['vocab']} holds non-integer token ids ({err}).") from err
    raw = read_weights(files["weights"])
    if not isinstance(raw, Mapping) or not all(hasattr(v, "shape") for v in raw.values()):
        raise CheckpointError(
            f"{files['weights']} is not a state dict of tensors; save it with "
            "torch.save(model.state_dict(), 'best_model.pt')."
        )
    state, dropped = backbone_state(raw)
    torch_layer = any("self_attn.in_proj_" in k for k in raw)
    config = scgpt_config(args, state, str(files["weights"]), torch_layer)
    too_big = [k for k, v in vocab.items() if not 0 <= v < config["vocab_size"]]
    if too_big:
        raise CheckpointError(
            f"{files['vocab']} holds token ids outside the model's {config['vocab_size']} gene "
            f"embeddings (e.g. {too_big[:3]}); pass the vocab.json released with these weights."
        )
    pad_token = str(args.get("pad_token", PAD))
    special = {"pad": vocab.get(pad_token), "cls": vocab.get(CLS), "eoc": vocab.get(EOC)}
    for name, token in (("pad", pad_token), ("cls", CLS)):
        if special[name] is None:
            raise CheckpointError(
                f"{files['vocab']} has no {token!r} token, which scGPT puts "
                f"{'after each cell' if name == 'pad' else 'first in each cell'}; this "
                "vocabulary does not belong to an scGPT model."
            )
    return ScGPTCheckpoint(
        args=args,
        config=config,
        state_dict=state,
        vocab=vocab,
        special=special,
        source=str(Path(path).resolve()),
        sha256=file_sha256(files["weights"]),
        dropped=dropped,
    )


def _random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict:
    """Random tensors of the given shapes: weights ``N(0, 1/fan_in)``, LayerNorm scales
    around 1 and biases around 0, so every tensor matters to a forward pass."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if key.endswith("norm.weight") or ".norm1.weight" in key or ".norm2.weight" in key:
            t = 1.0 + 0.1 * t
        elif len(shape) == 1:
            t = 0.1 * t
        else:
            t = t / max(shape[-1], 1) ** 0.5
        out[key] = t.contiguous()
    return out


def write_random_scgpt(
    path: str | os.PathLike,
    genes: Sequence[str],
    *,
    embsize: int = 32,
    nheads: int = 2,
    d_hid: int = 64,
    nlayers: int = 2,
    n_bins: int = 51,
    max_seq_len: int = 64,
    input_emb_style: str = "continuous",
    flash_names: bool = True,
    pre_norm: bool = False,
    dropout: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write a small, randomly initialised checkpoint in scGPT's layout (tests and docs only).

    Real weights come from scGPT's release (e.g. ``scGPT_human``), downloaded by the user
    elsewhere; that folder is then passed to :func:`load_scgpt` as is. This writes the same
    three files: ``args.json`` (scGPT's names and its pretraining values where they do not
    set a size: ``pad_value`` -2, ``input_style`` ``"binned"``), ``vocab.json`` (``genes``
    in order, then ``<pad>``, ``<cls>``, ``<eoc>``, as scGPT appends them) and
    ``best_model.pt`` (``torch.save`` of a state dict, with pretraining heads that a cell
    encoder must leave out). The tensors are built from scGPT's parameter names and
    shapes, not from this package's encoder.

    Parameters
    ----------
    path
        Folder to write (created if needed).
    genes
        Vocabulary keys (gene symbols), in token order.
    embsize, nheads, d_hid, nlayers, n_bins, max_seq_len, input_emb_style, dropout
        scGPT's arguments of the same names.
    flash_names
        Name each layer's query/key/value map ``self_attn.Wqkv`` (flash-attn models, the
        released ones) rather than ``self_attn.in_proj_*`` (torch's layer).
    pre_norm
        scGPT's ``pre_norm`` argument (it applies to flash-attn layers only).
    seed
        Seed of the random weights.

    Returns
    -------
    The folder.
    """
    import torch

    if input_emb_style not in INPUT_EMB_STYLES:
        raise ValueError(f"input_emb_style={input_emb_style!r}; choose one of {INPUT_EMB_STYLES}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for gene in genes:
        if str(gene) in vocab or str(gene).startswith("<"):
            raise ValueError(f"Gene {gene!r} is listed twice (or looks like a special token).")
        vocab[str(gene)] = len(vocab)
    for token in (PAD, CLS, EOC):
        vocab[token] = len(vocab)
    d, n = embsize, len(vocab)
    pad_value = n_bins if input_emb_style == "category" else -2
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embedding.weight": (n, d),
        "encoder.enc_norm.weight": (d,),
        "encoder.enc_norm.bias": (d,),
    }
    if input_emb_style == "continuous":
        shapes |= {
            "value_encoder.linear1.weight": (d, 1),
            "value_encoder.linear1.bias": (d,),
            "value_encoder.linear2.weight": (d, d),
            "value_encoder.linear2.bias": (d,),
            "value_encoder.norm.weight": (d,),
            "value_encoder.norm.bias": (d,),
        }
    elif input_emb_style == "category":
        shapes |= {
            "value_encoder.embedding.weight": (n_bins + 2, d),
            "value_encoder.enc_norm.weight": (d,),
            "value_encoder.enc_norm.bias": (d,),
        }
    qkv = "self_attn.Wqkv." if flash_names else "self_attn.in_proj_"
    for i in range(nlayers):
        p = f"transformer_encoder.layers.{i}."
        shapes |= {
            f"{p}{qkv}weight": (3 * d, d),
            f"{p}{qkv}bias": (3 * d,),
            f"{p}self_attn.out_proj.weight": (d, d),
            f"{p}self_attn.out_proj.bias": (d,),
            f"{p}linear1.weight": (d_hid, d),
            f"{p}linear1.bias": (d_hid,),
            f"{p}linear2.weight": (d, d_hid),
            f"{p}linear2.bias": (d,),
            f"{p}norm1.weight": (d,),
            f"{p}norm1.bias": (d,),
            f"{p}norm2.weight": (d,),
            f"{p}norm2.bias": (d,),
        }
    # Pretraining heads (expression decoder, MVC decoder, classifier): left out on loading.
    shapes |= {
        "decoder.fc.0.weight": (d, d),
        "decoder.fc.0.bias": (d,),
        "decoder.fc.4.weight": (1, d),
        "mvc_decoder.gene2query.weight": (d, d),
        "cls_decoder._decoder.0.weight": (d, d),
    }
    torch.save(_random_tensors(shapes, seed), path / "best_model.pt")
    args = {
        "embsize": embsize,
        "nheads": nheads,
        "d_hid": d_hid,
        "nlayers": nlayers,
        "n_layers_cls": 3,
        "dropout": dropout,
        "n_bins": n_bins,
        "input_style": "binned",
        "input_emb_style": input_emb_style,
        "pad_token": PAD,
        "pad_value": pad_value,
        "mask_value": -1,
        "max_seq_len": max_seq_len,
        "fast_transformer": flash_names,
        "pre_norm": pre_norm,
    }
    (path / "args.json").write_text(json.dumps(args, indent=2))
    (path / "vocab.json").write_text(json.dumps(vocab))
    return path


__all__ = [
    "ScGPTCheckpoint",
    "backbone_state",
    "find_scgpt_files",
    "load_scgpt",
    "scgpt_config",
    "write_random_scgpt",
]

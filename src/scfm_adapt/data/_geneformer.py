"""Geneformer checkpoints: the folder layout, its dictionaries and random checkpoints for tests.

Geneformer ships as a folder: ``config.json`` (a Hugging Face ``BertConfig``), the weights
(``model.safetensors`` or ``pytorch_model.bin``), a token dictionary (Ensembl id → token id,
with ``"<pad>"`` and ``"<mask>"``; V2 adds ``"<cls>"`` and ``"<eos>"``) and optionally a gene
median dictionary (Ensembl id → median normalised expression over the pretraining corpus).
The dictionaries are pickles, and a pickle can run arbitrary code when loaded, so they are
read with :func:`safe_load_pickle`, which builds plain data only.

Nothing here imports torch or transformers at import time; the functions that need them
import them when called.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ._checksums import file_sha256
from ._vocab import map_genes_to_vocab, read_weights

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = {"pad": PAD, "mask": MASK, "cls": CLS, "eos": EOS}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_MAPPING_SUFFIXES = (".pkl", ".pickle", ".json")
# Geneformer's repository names its dictionaries by corpus (``token_dictionary_gc104M.pkl``).
_TOKEN_DICT_STEM, _MEDIAN_STEM = "token_dictionary", "gene_median_dictionary"


# ---------------------------------------------------------------------------- safe pickles
def _numpy_scalar():
    # numpy >= 2 moved ``numpy.core`` to ``numpy._core``; importing the old name warns.
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


def _codecs_encode():
    # Protocol <= 2 pickles store the raw bytes of a numpy scalar as ``_codecs.encode(str,
    # "latin1")``: a pure string → bytes conversion, needed to read older dictionaries.
    import _codecs

    return _codecs.encode


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds plain data only: every global but numpy's scalar constructors
    is refused, so loading can never call ``os.system`` and the like."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise CheckpointError(
                f"{self.source} is not a plain-data pickle: it refers to the global "
                f"{module}.{name}, which could run code when loaded, so it was not loaded. "
                "A gene dictionary holds only strings and numbers; re-create the file from a "
                "trusted source, or convert it to JSON."
            )
        return factory()


def _to_python(obj: Any, source: str) -> Any:
    """``obj`` with numpy scalars turned into Python numbers (recursively)."""
    if isinstance(obj, dict):
        return {_to_python(k, source): _to_python(v, source) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [_to_python(v, source) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise CheckpointError(f"{source} holds a {type(obj).__name__}; expected plain data only.")


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle that may hold plain data only.

    Dictionaries, lists, tuples, strings, numbers, booleans, ``None`` and numpy integer and
    float scalars are rebuilt; any other global raises
    :class:`~scfm_adapt.errors.CheckpointError` before it is called.

    Parameters
    ----------
    path
        The pickle file.

    Returns
    -------
    The unpickled object, with numpy scalars converted to Python ``int`` / ``float``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"Cannot read {path}: {err}") from err
    try:
        obj = _PlainDataUnpickler(io.BytesIO(raw), str(path)).load()
    except CheckpointError:
        raise
    except Exception as err:  # truncated or not a pickle at all
        raise CheckpointError(f"{path} is not a readable pickle ({err}).") from err
    return _to_python(obj, str(path))


def load_mapping(path: str | os.PathLike) -> dict:
    """A dictionary from a ``.pkl`` / ``.pickle`` (read with :func:`safe_load_pickle`) or a
    ``.json`` file, chosen by suffix.

    Raises
    ------
    CheckpointError
        Unknown suffix, unreadable file, or content that is not a dictionary.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"Cannot read {path} as JSON ({err}).") from err
    elif suffix in (".pkl", ".pickle"):
        obj = safe_load_pickle(path)
    else:
        raise CheckpointError(
            f"{path}: unknown dictionary format {suffix!r}; expected one of {_MAPPING_SUFFIXES}."
        )
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}; expected a dictionary.")
    return obj


# ---------------------------------------------------------------------------- files
def _find_mapping(folder: Path, stem: str) -> Path | None:
    """``stem.pkl`` / ``stem.json`` in ``folder``, else the single ``stem*.pkl|json`` there."""
    for suffix in _MAPPING_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    found = sorted(
        p for p in folder.glob(f"{stem}*") if p.suffix.lower() in _MAPPING_SUFFIXES and p.is_file()
    )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        kind = "token_dictionary" if stem == _TOKEN_DICT_STEM else "gene_medians"
        raise CheckpointError(
            f"{folder} holds several candidate dictionaries ({names}); pass {kind}=... "
            "naming the one that belongs to this model."
        )
    return found[0] if found else None


def find_geneformer_files(
    path: str | os.PathLike,
    token_dictionary: str | os.PathLike | None = None,
    gene_medians: str | os.PathLike | None = None,
) -> dict[str, Path | None]:
    """The files of a Geneformer-style checkpoint folder.

    Parameters
    ----------
    path
        The folder holding ``config.json`` and ``model.safetensors`` (or
        ``pytorch_model.bin``).
    token_dictionary, gene_medians
        Explicit dictionary files; by default ``token_dictionary*.pkl|json`` and
        ``gene_median_dictionary*.pkl|json`` are looked up in ``path``.

    Returns
    -------
    ``{"config", "weights", "token_dictionary", "gene_medians"}`` → path (``gene_medians``
    may be ``None``).

    Raises
    ------
    CheckpointError
        A required file is missing; the message lists what was found.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; pass the folder holding the model's config.json and "
            "weights (e.g. a local copy of a Geneformer model from Hugging Face)."
        )
    present = sorted(p.name for p in folder.iterdir())
    listing = f"found: {present[:20]}" if present else "the folder is empty"
    missing = []
    config = folder / "config.json"
    if not config.is_file():
        missing.append("no config.json")
    weights = next((folder / w for w in _WEIGHT_FILES if (folder / w).is_file()), None)
    if weights is None:
        if any(n.endswith(".index.json") for n in present):
            missing.append("sharded weights (*.index.json) are not supported; save them unsharded")
        else:
            missing.append(f"no weights ({' or '.join(_WEIGHT_FILES)})")
    if token_dictionary is not None:
        tokens = Path(token_dictionary)
        if not tokens.is_file():
            missing.append(f"token_dictionary={str(tokens)!r} does not exist")
    else:
        tokens = _find_mapping(folder, _TOKEN_DICT_STEM)
        if tokens is None:
            missing.append(
                f"no token dictionary ({_TOKEN_DICT_STEM}.pkl or .json); pass token_dictionary=..."
            )
    if gene_medians is not None:
        medians = Path(gene_medians)
        if not medians.is_file():
            missing.append(f"gene_medians={str(medians)!r} does not exist")
    else:
        medians = _find_mapping(folder, _MEDIAN_STEM)
    if missing:
        raise CheckpointError(
            f"Not a Geneformer-style checkpoint: {'; '.join(missing)} in {folder} ({listing})."
        )
    return {
        "config": config,
        "weights": weights,
        "token_dictionary": tokens,
        "gene_medians": medians,
    }


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class GeneformerCheckpoint:
    """A Geneformer-style checkpoint read by :func:`load_geneformer`.

    Attributes
    ----------
    config
        The ``BertConfig`` as a dictionary (``config.json``).
    state_dict
        Weights of a ``transformers.BertModel`` without pooler: the ``bert.`` prefix of
        ``BertForMaskedLM`` stripped and its masked-LM head (``cls.*``) dropped.
    vocab
        Token dictionary, Ensembl id (or special token) → token id.
    medians
        Gene median dictionary, Ensembl id → median, or ``None``.
    special
        Token ids of ``"pad"``, ``"mask"``, ``"cls"``, ``"eos"`` (``None`` when absent).
    source
        The checkpoint folder.
    sha256
        SHA-256 of the weights file, to record which weights an adapted model was built on.
    """

    config: dict
    state_dict: dict
    vocab: dict[str, int]
    medians: dict[str, float] | None
    special: dict[str, int | None]
    source: str
    sha256: str

    @property
    def max_len(self) -> int:
        """Genes per cell the model reads: its input size minus the ``<cls>``/``<eos>``
        tokens it uses."""
        n_special = sum(self.special.get(k) is not None for k in ("cls", "eos"))
        return int(self.config["max_position_embeddings"]) - n_special


def backbone_state(state_dict: Mapping[str, Any]) -> dict:
    """``BertModel`` keys of a ``BertForMaskedLM`` (or ``BertModel``) state dict: the ``bert.``
    prefix stripped, the masked-LM head (``cls.*``), the pooler and the non-persistent
    buffers (``position_ids``, ``token_type_ids``, saved by old transformers) dropped, and
    the ``gamma``/``beta`` LayerNorm names of very old checkpoints renamed."""
    has_prefix = any(k.startswith("bert.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if has_prefix:
            if not key.startswith("bert."):
                continue  # the MLM head (cls.*) and anything else outside the backbone
            key = key[len("bert.") :]
        if key.startswith("pooler.") or key in (
            "embeddings.position_ids",
            "embeddings.token_type_ids",
        ):
            continue
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        out[key] = value
    return out


def load_geneformer(
    path: str | os.PathLike,
    token_dictionary: str | os.PathLike | None = None,
    gene_medians: str | os.PathLike | None = None,
) -> GeneformerCheckpoint:
    """Read a Geneformer-style checkpoint folder (nothing is downloaded).

    Parameters
    ----------
    path
        Local folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``,
        as downloaded from Geneformer's Hugging Face repository.
    token_dictionary, gene_medians
        The dictionaries, if they are not in ``path`` (Geneformer keeps them in its Python
        package, e.g. ``geneformer/token_dictionary_gc104M.pkl``).

    Returns
    -------
    :class:`GeneformerCheckpoint`

    Raises
    ------
    CheckpointError
        Missing or unreadable files, an unsupported configuration, or a token dictionary
        whose ids do not fit the model's vocabulary size.
    """
    files = find_geneformer_files(path, token_dictionary, gene_medians)
    try:
        config = json.loads(files["config"].read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Cannot read {files['config']} ({err}).") from err
    _check_config(config, files["config"])
    state = backbone_state(read_weights(files["weights"]))
    vocab = {str(k): int(v) for k, v in load_mapping(files["token_dictionary"]).items()}
    too_big = [k for k, v in vocab.items() if not 0 <= v < int(config["vocab_size"])]
    if too_big:
        raise CheckpointError(
            f"{files['token_dictionary']} holds token ids outside the model's vocabulary of "
            f"{config['vocab_size']} (e.g. {too_big[:3]}); it belongs to another model: pass "
            "the token dictionary released with these weights as token_dictionary=..."
        )
    medians = None
    if files["gene_medians"] is not None:
        medians = {str(k): float(v) for k, v in load_mapping(files["gene_medians"]).items()}
    special = {k: vocab.get(tok) for k, tok in SPECIAL_TOKENS.items()}
    if special["pad"] is None:
        special["pad"] = int(config.get("pad_token_id") or 0)
    return GeneformerCheckpoint(
        config=config,
        state_dict=state,
        vocab=vocab,
        medians=medians,
        special=special,
        source=str(Path(path).resolve()),
        sha256=file_sha256(files["weights"]),
    )


def _check_config(config: dict, where: Path) -> None:
    if config.get("model_type") != "bert":
        raise CheckpointError(
            f"{where}: model_type is {config.get('model_type')!r}; only BERT-style "
            "(Geneformer) checkpoints are supported."
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
        if key not in config:
            raise CheckpointError(f"{where} lacks {key!r}; is it a BertConfig?")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"{where}: position_embedding_type={config['position_embedding_type']!r} is not "
            "supported (only 'absolute', as in Geneformer)."
        )
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise CheckpointError(f"{where}: a decoder BERT is not a cell encoder.")


def write_random_geneformer(
    path: str | os.PathLike,
    genes: Sequence[str],
    *,
    hidden: int = 32,
    n_layers: int = 2,
    n_heads: int = 2,
    intermediate: int = 64,
    max_len: int = 64,
    v2: bool = False,
    seed: int = 0,
    medians: Mapping[str, float] | None = None,
) -> Path:
    """Write a small, randomly initialised Geneformer-style checkpoint (tests and docs only).

    Real weights come from Geneformer's repository on Hugging Face, downloaded by the user
    elsewhere; that folder is then passed to :func:`load_geneformer` as is. This writes the
    same layout: ``config.json`` and ``model.safetensors`` of a ``BertForMaskedLM``,
    ``token_dictionary.pkl`` (``"<pad>"`` = 0, ``"<mask>"`` = 1, with ``v2`` also
    ``"<cls>"`` and ``"<eos>"``, then ``genes``) and, given ``medians``,
    ``gene_median_dictionary.pkl``.

    Parameters
    ----------
    path
        Folder to write (created if needed).
    genes
        Vocabulary keys (Ensembl ids), in token order.
    hidden, n_layers, n_heads, intermediate, max_len
        BERT sizes; ``max_len`` is ``max_position_embeddings``.
    v2
        Add ``<cls>`` and ``<eos>`` as Geneformer V2 does.
    seed
        Seed of the random weights.
    medians
        Gene → median normalised expression.

    Returns
    -------
    The folder.
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = [PAD, MASK] + ([CLS, EOS] if v2 else [])
    vocab = {tok: i for i, tok in enumerate(specials)}
    for gene in genes:
        if str(gene) in vocab:
            raise ValueError(f"Gene {gene!r} is listed twice (or is a special token).")
        vocab[str(gene)] = len(vocab)
    # Geneformer's own settings: ReLU, post-LN BERT, dropout 0.02, pad id 0.
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_len,
        hidden_act="relu",
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        type_vocab_size=2,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BertForMaskedLM(config)
    finally:
        torch.random.set_rng_state(state)  # the caller's random stream is left untouched
    bar_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # transformers >= 5 always writes safetensors (``model.safetensors``).
        model.save_pretrained(path)
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()
    with (path / f"{_TOKEN_DICT_STEM}.pkl").open("wb") as f:
        pickle.dump(vocab, f)
    if medians is not None:
        with (path / f"{_MEDIAN_STEM}.pkl").open("wb") as f:
            pickle.dump({str(k): float(v) for k, v in medians.items()}, f)
    return path


__all__ = [
    "GeneformerCheckpoint",
    "backbone_state",
    "find_geneformer_files",
    "load_geneformer",
    "load_mapping",
    "map_genes_to_vocab",
    "safe_load_pickle",
    "write_random_geneformer",
]

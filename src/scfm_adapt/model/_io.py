"""Checkpoints: safetensors weights plus a JSON config, written atomically.

A checkpoint is a folder::

    model.safetensors   the module's state dict (tensors only, nothing executable)
    config.json         format version, class, init kwargs, genes, registry, history,
                        the weights' size and SHA-256

Loading never unpickles: JSON and safetensors carry data only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import CheckpointError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


# ------------------------------------------------------------------ JSON codec
def to_jsonable(obj: Any) -> Any:
    """Turn registries (dicts of numpy arrays, pandas frames, attrdicts) into plain JSON."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": to_jsonable(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, pd.DataFrame):
        return {"__dataframe__": to_jsonable(obj.reset_index().to_dict(orient="list"))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"Cannot store {type(obj).__name__} in a checkpoint config: {obj!r}")


def from_jsonable(obj: Any) -> Any:
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj:
        dtype = obj["dtype"]
        return np.asarray(obj["__ndarray__"], dtype=object if dtype == "object" else dtype)
    if "__dataframe__" in obj:
        df = pd.DataFrame(from_jsonable(obj["__dataframe__"]))
        return df.set_index(df.columns[0]) if len(df.columns) else df
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: from_jsonable(v) for k, v in obj.items()}


# ------------------------------------------------------------------ files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    path: str | os.PathLike, state_dict: dict, config: dict, overwrite: bool = False
) -> Path:
    """Write ``state_dict`` and ``config`` into folder ``path`` atomically.

    Everything is written into a temporary sibling folder first and renamed into place, so
    an interrupted save leaves any previous checkpoint at ``path`` intact.
    """
    from safetensors.torch import save as st_save

    with atomic_dir(path, overwrite) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        blob = st_save(
            tensors, metadata={"format": "pt", "scfm_format_version": str(FORMAT_VERSION)}
        )
        _fsync_write(tmp / WEIGHTS, blob)
        config = {
            **config,
            "format_version": FORMAT_VERSION,
            "weights": {
                "file": WEIGHTS,
                "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
            },
        }
        _fsync_write(tmp / CONFIG, json.dumps(to_jsonable(config), indent=1).encode())
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    An exception inside the block removes the temporary folder and leaves any previous
    folder at ``path`` intact.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[dict, dict]:
    """Read and verify a checkpoint folder; returns ``(state_dict, config)``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint folder at {path}; pass the folder given to save().")
    cfg_file, w_file = path / CONFIG, path / WEIGHTS
    if not cfg_file.exists():
        pickles = [p.name for p in path.iterdir() if p.suffix in (".pt", ".pkl", ".ckpt")]
        hint = f" It holds {pickles}: pickled checkpoints are never loaded." if pickles else ""
        raise CheckpointError(f"{path} has no {CONFIG}; it is not an scfm_adapt checkpoint.{hint}")
    try:
        config = from_jsonable(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the file is damaged.") from e
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, this scfm_adapt reads {FORMAT_VERSION}. "
            "Upgrade scfm_adapt to load it."
        )
    meta = config["weights"]
    if not w_file.exists():
        raise CheckpointError(f"{w_file} is missing; the checkpoint is incomplete.")
    size = w_file.stat().st_size
    if size != meta["bytes"]:
        raise CheckpointError(
            f"{w_file} has {size} bytes, the config records {meta['bytes']}: the file is "
            "truncated or was replaced. Re-save or re-download the checkpoint."
        )
    if _sha256(w_file) != meta["sha256"]:
        raise CheckpointError(
            f"{w_file} does not match the SHA-256 in {CONFIG}: the file is damaged or was "
            "modified. Re-save or re-download the checkpoint."
        )
    return load_file(w_file, device=map_location), config

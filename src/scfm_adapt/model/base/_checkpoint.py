"""Checkpoints: safetensors weights plus a JSON config, written atomically.

A checkpoint is a folder::

    model.safetensors   the module's state dict (tensors only, nothing executable)
    config.json         format version, class, init kwargs, genes, registry, history,
                        a manifest (every file's size and SHA-256) and its own SHA-256
    adata.h5ad          optional (``save_anndata=True``), listed in the manifest

Loading never unpickles: JSON and safetensors carry data only. Configs of earlier formats
are migrated on load (:data:`MIGRATIONS`); a newer format asks for an upgrade.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...errors import CheckpointError

logger = logging.getLogger(__name__)

#: Version of the folder layout and config; older ones are migrated on load.
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: The model card written beside them (:mod:`._card`).
CARD = "README.md"


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


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` (through :func:`to_jsonable`) to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    _fsync_write(tmp, json.dumps(to_jsonable(obj), indent=1).encode())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a file written by :func:`write_json` (numpy arrays and frames restored)."""
    return from_jsonable(json.loads(Path(path).read_text()))


def _config_digest(raw: dict) -> str:
    """SHA-256 of a config's canonical JSON, without its own ``config_sha256`` entry."""
    body = {k: v for k, v in raw.items() if k != "config_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_checkpoint(
    path: str | os.PathLike,
    state_dict: dict,
    config: dict,
    overwrite: bool = False,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
    unlisted_files: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write ``state_dict`` and ``config`` into folder ``path`` atomically.

    Everything is written into a temporary sibling folder first and renamed into place, so
    an interrupted save leaves any previous checkpoint at ``path`` intact. ``extra_files``
    maps file names to writers (called with the file's path) for further files, e.g. the
    AnnData; every file's size and SHA-256 go into the config's manifest.
    ``unlisted_files`` are written the same way but left out of the manifest: files for
    people (the model card) that may be edited without making the checkpoint unloadable.
    """
    from safetensors.torch import save as st_save

    with atomic_dir(path, overwrite) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        blob = st_save(
            tensors, metadata={"format": "pt", "scfm_format_version": str(FORMAT_VERSION)}
        )
        _fsync_write(tmp / WEIGHTS, blob)
        files = {WEIGHTS: {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
            files[name] = _file_record(tmp / name)
        for name, writer in (unlisted_files or {}).items():
            writer(tmp / name)
        config = to_jsonable({**config, "format_version": FORMAT_VERSION, "files": files})
        config["config_sha256"] = _config_digest(config)
        _fsync_write(tmp / CONFIG, json.dumps(config, indent=1).encode())
    return Path(path)


def _leftovers(path: Path, kind: str) -> list[Path]:
    """Sibling folders an interrupted :func:`atomic_dir` left behind (``kind``: old, tmp)."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.{kind}-*"), key=lambda p: p.stat().st_mtime)


def recover_interrupted_save(path: str | os.PathLike) -> bool:
    """Put back the previous checkpoint when a save died between its two renames.

    :func:`atomic_dir` moves the previous folder aside (``.NAME.old-*``) just before it
    renames the new one into place; a process killed in between leaves no folder at
    ``path``. Returns whether a folder was restored.
    """
    path = Path(path)
    if path.exists():
        return False
    old = _leftovers(path, "old")
    if not old:
        return False
    os.replace(old[-1], path)
    _fsync_dir(path.parent)
    logger.warning(
        "A save to %s was interrupted; restored the previous checkpoint from %s.", path, old[-1]
    )
    return True


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    An exception inside the block removes the temporary folder and leaves any previous
    folder at ``path`` intact; a process killed between the two final renames is repaired
    by :func:`recover_interrupted_save` on the next save or load.
    """
    path = Path(path)
    recover_interrupted_save(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # the new folder never arrived: put the previous one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in _leftovers(path, "tmp"):  # from saves killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------ format versions
def _v1_to_v2(config: dict) -> dict:
    """Format 1 recorded the weights alone (``"weights"``); format 2 keeps a manifest of
    every file (``"files"``), so that an AnnData saved beside the weights is checked too,
    and a checksum of the config itself (absent from migrated configs)."""
    config = dict(config)
    w = config.pop("weights")
    config["files"] = {w["file"]: {"bytes": w["bytes"], "sha256": w["sha256"]}}
    config["format_version"] = 2
    return config


#: ``version -> function`` bringing a config of that version to the next one.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def migrate_config(config: dict, where: str = "checkpoint") -> dict:
    """Bring a checkpoint config of any earlier format to :data:`FORMAT_VERSION`."""
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has checkpoint format {version!r}, this scfm_adapt reads formats up to "
            f"{FORMAT_VERSION}. Upgrade scfm_adapt (pip install -U scfm-adapt) to load it."
        )
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            raise CheckpointError(
                f"{where} has checkpoint format {version}, which this scfm_adapt cannot "
                f"migrate (it migrates formats {sorted(MIGRATIONS)}). Load it with an older "
                "scfm_adapt and save it again."
            )
        config = MIGRATIONS[version](config)
        if config.get("format_version") != version + 1:
            raise AssertionError(f"migration from format {version} did not advance")
        version += 1
    return config


def read_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[dict, dict]:
    """Read and verify a checkpoint folder; returns ``(state_dict, config)``.

    Older formats are migrated (:data:`MIGRATIONS`). Every file in the manifest is checked
    against its recorded size and SHA-256 before anything is parsed, and the weights are
    read by safetensors, which holds tensors only: nothing in a checkpoint is ever run.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    recover_interrupted_save(path)
    if not path.is_dir():
        raise CheckpointError(f"No checkpoint folder at {path}; pass the folder given to save().")
    cfg_file = path / CONFIG
    if not cfg_file.exists():
        pickles = [p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".pkl", ".ckpt")]
        hint = f" It holds {pickles}: pickled checkpoints are never loaded." if pickles else ""
        raise CheckpointError(f"{path} has no {CONFIG}; it is not an scfm_adapt checkpoint.{hint}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the file is damaged.") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} is not a checkpoint config (a JSON object).")
    if "config_sha256" in raw:  # formats >= 2; format 1 configs have none
        try:
            digest = _config_digest(raw)
        except ValueError as e:  # NaN/inf literals: never written by write_checkpoint
            digest = repr(e)
        if digest != raw["config_sha256"]:
            raise CheckpointError(
                f"{cfg_file} does not match its own SHA-256 (config_sha256): the file is "
                "damaged or was edited. Re-save or re-download the checkpoint."
            )
    try:
        config = from_jsonable(raw)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{cfg_file} holds malformed values ({e}); it is damaged.") from e
    try:
        config = migrate_config(config, str(path))
        files = config["files"]
        if WEIGHTS not in files:
            raise KeyError(WEIGHTS)
        records = {name: (int(r["bytes"]), str(r["sha256"])) for name, r in files.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{cfg_file} lacks a valid file manifest ({type(e).__name__}: {e}); the config "
            "is damaged or was edited. Re-save or re-download the checkpoint."
        ) from e
    for name, (n_bytes, digest) in records.items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete.")
        size = f.stat().st_size
        if size != n_bytes:
            raise CheckpointError(
                f"{f} has {size} bytes, the config records {n_bytes}: the file is "
                "truncated or was replaced. Re-save or re-download the checkpoint."
            )
        if _sha256(f) != digest:
            raise CheckpointError(
                f"{f} does not match the SHA-256 in {CONFIG}: the file is damaged or was "
                "modified. Re-save or re-download the checkpoint."
            )
    try:
        state = load_file(path / WEIGHTS, device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path / WEIGHTS} is not a readable safetensors file ({e}). Re-save or "
            "re-download the checkpoint."
        ) from e
    return state, config

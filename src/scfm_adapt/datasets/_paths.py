"""Where the data sets live, and how a missing one is fetched.

Resolution order for a data file ``filename`` (a path relative to the data folder, e.g.
``"kang2018_ctrl_8donors.h5ad"`` or ``"go/go_terms_and_parents_GOdb_3.16.tsv.gz"``):

1. an explicit ``path=`` argument (the file itself, or a folder that holds it);
2. the data folder :func:`data_dir`: ``$SCFM_ADAPT_DATA`` when that variable is set, otherwise
   ``../shared/data`` relative to the current working directory;
3. the download cache :func:`cache_dir` (``~/.cache/scfm_adapt``, honouring
   ``$XDG_CACHE_HOME``).

Nothing is downloaded unless a loader is called with ``download=True``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

ENV_VAR = "SCFM_ADAPT_DATA"
"""Environment variable naming the folder that holds the data files."""

_FALLBACK = Path("..") / "shared" / "data"
_USER_AGENT = "scfm_adapt-datasets (+https://github.com/scverse)"


def data_dir() -> Path | None:
    """Return the folder the data sets are read from, or ``None`` when there is none.

    The folder is ``$SCFM_ADAPT_DATA`` when that environment variable is set (and ``None`` if
    it does not name an existing folder: a set variable is never silently overridden), else
    ``../shared/data`` relative to the current working directory when it exists.

    Returns
    -------
    pathlib.Path or None
        The resolved, absolute data folder; ``None`` if no data folder is available (the
        loaders then look in :func:`cache_dir` and, with ``download=True``, download there).
    """
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        return p.resolve() if p.is_dir() else None
    p = Path.cwd() / _FALLBACK
    return p.resolve() if p.is_dir() else None


def cache_dir() -> Path:
    """Return the download cache folder (``~/.cache/scfm_adapt``; not created here).

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set.

    Returns
    -------
    pathlib.Path
        The cache folder; downloads made with ``download=True`` are written under it.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "scfm_adapt"


def _candidates(filename: str, path: str | os.PathLike | None) -> list[Path]:
    """Places a data file is looked for, in order."""
    out: list[Path] = []
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            out += [p / filename, p / Path(filename).name]
        else:
            out.append(p)
        return out
    d = data_dir()
    if d is not None:
        out.append(d / filename)
    out.append(cache_dir() / filename)
    return out


def _resolve(filename: str, path: str | os.PathLike | None = None) -> Path | None:
    """Return the first existing location of ``filename`` (see module docstring), or None."""
    for c in _candidates(filename, path):
        if c.is_file():
            return c
    return None


def _missing_message(filename: str, url: str | None, path) -> str:
    looked = ", ".join(str(c) for c in _candidates(filename, path))
    env = os.environ.get(ENV_VAR)
    env_note = (
        f"${ENV_VAR} is set to {env!r}"
        + ("" if Path(env).expanduser().is_dir() else ", which is not an existing folder")
        if env
        else f"${ENV_VAR} is not set"
    )
    fixes = [
        f"set the environment variable {ENV_VAR} to a folder that holds {filename!r}",
        "pass path=... pointing at the file",
    ]
    if url is not None:
        fixes.append(f"call again with download=True to fetch it from {url} into {cache_dir()}")
    return (
        f"Data file {filename!r} not found (looked in: {looked}; {env_note}). "
        "To fix: " + "; or ".join(fixes) + "."
    )


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically (temporary file, then rename); return ``dest``.

    Uses only the standard library (:mod:`urllib`), so ``file://`` URLs work as well.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=60) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        if sha256 is not None:
            got = _sha256(Path(tmp))
            if got != sha256.lower():
                raise OSError(f"Checksum mismatch for {url}: expected sha256 {sha256}, got {got}.")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _fetch(
    filename: str,
    url: str | None,
    path: str | os.PathLike | None = None,
    download: bool = False,
    *,
    sha256: str | None = None,
    build: Callable[[Path], None] | None = None,
) -> Path:
    """Return the local path of a data file, downloading it only when ``download=True``.

    Parameters
    ----------
    filename
        File name relative to the data folder (may contain a sub-folder, e.g. ``"go/x.tsv.gz"``).
    url
        Public source of the file (used only when downloading).
    path
        Explicit file or folder overriding the data-folder lookup.
    download
        When the file is not found locally: download it (``True``) or raise (``False``).
    sha256
        Optional checksum of the downloaded file (only for direct downloads, ``build=None``).
    build
        Optional ``build(dest)`` that writes the file to ``dest`` from the public source (for
        files converted from another format after download); its output is moved into place
        only when it succeeds. Default: download ``url`` to the destination as is.

    Raises
    ------
    FileNotFoundError
        When the file is absent and ``download=False``; the message names the file, the
        environment variable ``SCFM_ADAPT_DATA`` and ``download=True`` as the fixes.
    """
    found = _resolve(filename, path)
    if found is not None:
        return found
    if not download or url is None:
        raise FileNotFoundError(_missing_message(filename, url, path))
    if path is not None and not Path(path).expanduser().is_dir():
        dest = Path(path).expanduser()
    elif path is not None:
        dest = Path(path).expanduser() / filename
    else:
        dest = cache_dir() / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    if build is None:
        _download(url, dest, sha256=sha256)
        return dest
    tmp = dest.parent / f".part-{dest.name}"  # keeps the suffix (.h5ad, .tsv.gz)
    try:
        build(tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _raw_download(url: str, name: str) -> Path:
    """Download a source artefact (before conversion) into ``cache_dir()/raw`` once."""
    dest = cache_dir() / "raw" / name
    if not dest.is_file():
        _download(url, dest)
    return dest

"""Execute tutorial notebooks in place, so that the committed outputs are fresh.

    python tutorials/execute.py tutorials/01_pretrain_annotate_pbmc.ipynb [more.ipynb ...]
    python tutorials/execute.py --all

Each notebook runs in a fresh kernel with ``tutorials/`` as its working directory. When
``$SCFM_ADAPT_DATA`` is not set and ``../shared/data`` exists beside the repository, it is
pointed there (a notebook opened from ``tutorials/`` would otherwise look in
``tutorials/../shared/data``). The wall time of each notebook is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebook_env() -> dict[str, str]:
    """The environment a tutorial kernel gets (``$SCFM_ADAPT_DATA`` filled in when possible)."""
    env = dict(os.environ)
    shared = HERE.parent.parent / "shared" / "data"
    if "SCFM_ADAPT_DATA" not in env and shared.is_dir():
        env["SCFM_ADAPT_DATA"] = str(shared)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return env


def execute(path: Path, timeout: int = 1800, write: bool = True):
    """Run every cell of ``path`` in a new kernel; write the outputs back when ``write``.

    Returns the executed notebook and the wall time in seconds. A failing cell raises
    ``nbclient``'s ``CellExecutionError`` with the traceback, and nothing is written.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old = dict(os.environ)
    os.environ.update(notebook_env())  # the kernel inherits this process's environment
    try:
        t0 = time.perf_counter()
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}
        ).execute()
        wall = time.perf_counter() - t0
    finally:
        os.environ.clear()
        os.environ.update(old)
    if write:
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
    return nb, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--all", action="store_true", help="every tutorials/*.ipynb")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = sorted(HERE.glob("[0-9]*.ipynb")) if args.all else args.notebooks
    if not paths:
        parser.error("name notebooks or pass --all")
    for p in paths:
        _, wall = execute(Path(p).resolve(), timeout=args.timeout)
        print(f"{p}: executed in {wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

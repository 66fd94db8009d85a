"""The command line every peer runner shares: ``SPLITS PREDS --seed K``.

Standard library only: each runner imports it in its own peer's environment (a script's
folder is on ``sys.path`` when it runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def runner_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the runner's docstring as help and the arguments all runners take."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("splits", type=Path, help="export.py's folder")
    parser.add_argument("preds", type=Path, help="the predictions' folder")
    parser.add_argument("--seed", type=int, default=0)
    return parser

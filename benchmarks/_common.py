"""Plumbing shared by the benchmark scripts: donor split, quiet logs, memory, timers,
subprocesses, JSON, environment and markdown tables.

The metrics and baselines the scripts report are the package's own (``sfa.metrics``,
``sfa.baselines``), so a figure here is what a user computes on their data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

NA = "n/a"


# --------------------------------------------------------------------------- splits
def quiet() -> None:
    """Silence Lightning's and scvi-tools' per-run info messages and routine warnings."""
    for name in (
        "lightning.pytorch",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric",
        "scvi",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (
        ".*does not have many workers.*",
        ".*predefined_split.*",
        ".*Make sure the registered X field.*",
        ".*log_every_n_steps.*",
        ".*module\\(s\\) in eval mode.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def donor_split(
    donors: Sequence[Any], test_donors: Sequence[str] | None = None, n_test: int = 2
) -> tuple[list[str], list[str]]:
    """Split donors into train and test donors.

    Parameters
    ----------
    donors
        Donor label of every cell (any type; compared as strings).
    test_donors
        Donors to hold out. ``None`` takes the last ``n_test`` of the sorted donors (sorted
        numerically when every label is an integer, else as strings).
    n_test
        Number of test donors when ``test_donors`` is ``None``.

    Returns
    -------
    ``(train_donors, test_donors)`` as sorted lists of strings.

    Raises
    ------
    ValueError
        When a requested test donor does not exist, or no train donor would be left.
    """
    names = {str(d) for d in donors}
    key = (lambda s: (0, int(s), s)) if all(s.lstrip("-").isdigit() for s in names) else str
    ordered = sorted(names, key=key)
    if test_donors is None:
        test = ordered[-n_test:]
    else:
        test = [str(d) for d in test_donors]
        unknown = sorted(set(test) - names)
        if unknown:
            raise ValueError(f"Unknown test donors {unknown}; donors are {ordered}.")
    train = [d for d in ordered if d not in set(test)]
    if not train or not test:
        raise ValueError(f"Empty split: train donors {train}, test donors {test}.")
    return train, [d for d in ordered if d in set(test)]


# --------------------------------------------------------------------------- timing
def throughput(n_epochs: int, n_cells: int, seconds: float) -> float:
    """Training throughput in cells per second: ``n_epochs * n_cells / seconds``."""
    return n_epochs * n_cells / seconds if seconds > 0 else float("nan")


# --------------------------------------------------------------------------- memory
def _rss_scale_to_mib() -> float:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return 1 / 1024**2 if sys.platform == "darwin" else 1 / 1024


def _proc_status_mib(key: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``) in MiB; ``None`` off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    ``VmHWM`` on Linux, else ``ru_maxrss``. Linux carries ``ru_maxrss`` across ``exec``, so
    a worker started by a parent that had used more memory would report the parent's peak;
    ``VmHWM`` starts afresh with the new program. The value only grows over a process's
    life: run each model in a fresh subprocess (:func:`run_isolated`).
    """
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _rss_scale_to_mib()


def current_rss_mib() -> float:
    """Current resident set size of this process in MiB (``VmRSS``; NaN off Linux)."""
    rss = _proc_status_mib("VmRSS")
    return float("nan") if rss is None else rss


@contextmanager
def track_peak_memory() -> Iterator[dict[str, float | None]]:
    """Record the process's memory around a block (e.g. ``model.train()``).

    Yields a dict that is filled when the block exits:

    - ``rss_before_mib``: current RSS when entering;
    - ``peak_rss_mib``: peak RSS of the process on exit (:func:`peak_rss_mib`);
    - ``cuda_peak_mib``: ``torch.cuda.max_memory_allocated`` within the block (peak stats
      are reset on entry), or ``None`` without CUDA.
    """
    cuda = _cuda_available()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    record: dict[str, float | None] = {"rss_before_mib": current_rss_mib()}
    try:
        yield record
    finally:
        record["peak_rss_mib"] = peak_rss_mib()
        record["cuda_peak_mib"] = None
        if cuda:
            import torch

            torch.cuda.synchronize()
            record["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 1024**2


def _cuda_available() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- processes
@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """Wall time of a block: ``with timer() as t: ...``, then ``t["seconds"]``."""
    record: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - start


def run_isolated(cmd: Sequence[str], result_path: Path) -> dict[str, Any]:
    """Run a worker command in a fresh process (blocking) and read the JSON it writes.

    Workers run one after another, never in parallel, so that timings are not disturbed
    and each process's peak RSS belongs to one model.

    Parameters
    ----------
    cmd
        Command line, e.g. ``[sys.executable, script, "--worker", "scvi", ...]``.
    result_path
        JSON file the worker writes its results to.

    Raises
    ------
    RuntimeError
        When the worker exits non-zero or writes no result.
    """
    proc = subprocess.run(list(cmd), check=False)
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(
            f"Worker failed (exit code {proc.returncode}): {' '.join(map(str, cmd))}"
        )
    return json.loads(result_path.read_text())


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (numpy scalars and arrays allowed; NaN -> null)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"Not JSON serialisable: {type(o)}")

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=2, default=default) + "\n")


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_info() -> dict[str, Any]:
    """Versions, threads and hardware of the current process (imports torch)."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    dists = {
        "scvi": "scvi-tools",
        "scfm_adapt": "scfm-adapt",
        "scanpy": "scanpy",
        "sklearn": "scikit-learn",
    }
    for key, dist in dists.items():
        try:
            info[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[key] = None
    return info


# --------------------------------------------------------------------------- tables
def fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    """Format a number for a table; ``None``/NaN become ``"n/a"``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NA
    if isinstance(value, str):
        return value
    return f"{value:{spec}}{suffix}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the rest right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    return "\n".join(
        [line(headers), "|" + "|".join(f" {r} " for r in rule) + "|", *(line(r) for r in rows)]
    )


def pass_fail(ok: bool) -> str:
    """``"PASS"`` or ``"FAIL"``."""
    return "PASS" if ok else "FAIL"


# --------------------------------------------------------------------------- arrays
def dense(x: Any) -> np.ndarray:
    """A dense float32 array from a numpy or scipy sparse matrix."""
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)

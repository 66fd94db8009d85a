"""Helpers shared by the benchmark scripts: splits, metrics, memory, environment, tables.

Everything here is model-agnostic: functions take embeddings and label arrays (numpy), so
the annotation, generation and perturbation benchmarks can reuse them unchanged.
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


# --------------------------------------------------------------------------- metrics
def knn_transfer(
    x_ref: np.ndarray,
    y_ref: np.ndarray,
    x_query: np.ndarray,
    y_query: np.ndarray,
    k: int = 15,
) -> dict[str, float]:
    """Label transfer by a k-nearest-neighbour classifier from reference to query cells.

    A ``KNeighborsClassifier(k)`` (Euclidean, uniform weights) is fit on the reference
    embedding and labels and scored on the query cells.

    Parameters
    ----------
    x_ref, y_ref
        Reference embedding ``(n_ref, d)`` and labels ``(n_ref,)``.
    x_query, y_query
        Query embedding ``(n_query, d)`` and its true labels ``(n_query,)``.
    k
        Number of neighbours.

    Returns
    -------
    ``{"accuracy": ..., "macro_f1": ...}`` on the query cells.
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier

    y_ref, y_query = np.asarray(y_ref).astype(str), np.asarray(y_query).astype(str)
    pred = KNeighborsClassifier(n_neighbors=k).fit(x_ref, y_ref).predict(x_query)
    return {
        "accuracy": float(accuracy_score(y_query, pred)),
        "macro_f1": float(f1_score(y_query, pred, average="macro", zero_division=0)),
    }


def _normalized_entropy(counts: np.ndarray, n_max: int) -> np.ndarray:
    """Row-wise Shannon entropy of count vectors, divided by ``log(n_max)``."""
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h / math.log(n_max)


def batch_mixing_entropy(
    x: np.ndarray,
    batches: np.ndarray,
    groups: np.ndarray,
    k: int = 50,
) -> dict[str, Any]:
    """Within-group kNN entropy of batch labels (1 = perfectly mixed, 0 = unmixed).

    Definition. For each group ``g`` (a cell type) with cells ``S_g`` from ``B_g`` distinct
    batches (donors), and each cell ``i`` in ``S_g``: take its ``k_g = min(k, |S_g| - 1)``
    nearest other cells *of the same group* (Euclidean, in the embedding), let ``p_b`` be the
    fraction of them from batch ``b``, and score ``H_i = -sum_b p_b log p_b / log(min(B_g,
    k_g))``. A group's score is the mean of ``H_i`` over its cells; the reported score is the
    unweighted mean over groups. Groups with fewer than 2 batches are skipped. Restricting
    neighbours to the same group means differences in cell-type composition between
    batches are not counted as (lack of) mixing.

    The maximum 1 needs every batch equally present in every neighbourhood; when batches
    differ in size, even a perfectly mixed embedding scores below 1. ``reference`` gives
    the score of the batch composition itself (what random neighbours would get, up to
    sampling noise) as a yardstick. The score alone rewards erasing structure, so read it
    next to a conservation metric such as :func:`knn_transfer`.

    Parameters
    ----------
    x
        Embedding ``(n_cells, d)``.
    batches
        Batch (donor) label per cell.
    groups
        Group (cell type) label per cell.
    k
        Neighbours per cell.

    Returns
    -------
    ``{"score": float, "reference": float, "per_group": {group: score}, "k": k}``.
    """
    from sklearn.neighbors import NearestNeighbors

    batches, groups = np.asarray(batches).astype(str), np.asarray(groups).astype(str)
    per_group: dict[str, float] = {}
    reference: list[float] = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        codes, inverse = np.unique(batches[idx], return_inverse=True)
        k_g = min(k, len(idx) - 1)
        if len(codes) < 2 or k_g < 2:
            continue
        n_max = min(len(codes), k_g)
        nn = NearestNeighbors(n_neighbors=k_g + 1).fit(x[idx])
        neigh = nn.kneighbors(x[idx], return_distance=False)[:, 1:]  # drop the cell itself
        counts = np.zeros((len(idx), len(codes)))
        np.add.at(counts, (np.repeat(np.arange(len(idx)), k_g), inverse[neigh].ravel()), 1.0)
        per_group[str(g)] = float(_normalized_entropy(counts, n_max).mean())
        composition = np.bincount(inverse, minlength=len(codes))[None, :].astype(float)
        reference.append(float(_normalized_entropy(composition, n_max)[0]))
    score = float(np.mean(list(per_group.values()))) if per_group else float("nan")
    ref = float(np.mean(reference)) if reference else float("nan")
    return {"score": score, "reference": ref, "per_group": per_group, "k": k}


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


# --------------------------------------------------------------------------- baselines
def log_normalized(adata: Any, target_sum: float = 1e4) -> Any:
    """A copy of ``adata`` with ``X`` library-normalised to ``target_sum`` and ``log1p``-ed."""
    import scanpy as sc

    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def pca_baseline(
    adata: Any,
    fit_mask: np.ndarray | None = None,
    n_comps: int = 50,
    n_top_genes: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """The usual Scanpy embedding: log-normalised (top-variable) genes, then PCA.

    Counts are normalised to 10,000 per cell and ``log1p``-ed; when there are more than
    ``n_top_genes`` genes, the ``n_top_genes`` highly variable ones (Scanpy's default
    ``seurat`` flavour) are kept. Gene selection and PCA are fit on the ``fit_mask`` cells
    only and every cell is then projected, so held-out cells never inform the basis.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X``.
    fit_mask
        Boolean mask of the cells to fit on (default: all).
    n_comps
        Number of principal components (capped by the data's size).
    n_top_genes
        Highly variable genes to keep, when there are more genes than that.
    seed
        Random state of the PCA solver.

    Returns
    -------
    ``(n_cells, n_comps)`` embedding.
    """
    import scanpy as sc
    from sklearn.decomposition import PCA

    fit_mask = np.ones(adata.n_obs, bool) if fit_mask is None else np.asarray(fit_mask, bool)
    lognorm = log_normalized(adata)
    if lognorm.n_vars > n_top_genes:
        hvg = sc.pp.highly_variable_genes(
            lognorm[fit_mask], n_top_genes=n_top_genes, inplace=False
        )["highly_variable"].to_numpy()
        lognorm = lognorm[:, hvg]
    x = dense(lognorm.X)
    n_comps = min(n_comps, x.shape[1] - 1, int(fit_mask.sum()) - 1)
    pca = PCA(n_components=n_comps, random_state=seed).fit(x[fit_mask])
    return pca.transform(x).astype(np.float32)


def dense(x: Any) -> np.ndarray:
    """A dense float32 array from a numpy or scipy sparse matrix."""
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)

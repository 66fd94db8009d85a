"""Property-based fuzzing (hypothesis) of the public entry points.

Each property feeds random, often malformed, inputs to an entry point and requires that it
either succeeds with finite results or raises a *documented* error: an
:class:`~scfm_adapt.errors.SCFMInputError` subclass, or a ``ValueError`` / ``TypeError`` /
``KeyError`` raised deliberately by scfm_adapt's own code (the innermost frame is a
``raise`` statement in the package) with a message. Anything else (an IndexError from
numpy, a RuntimeError from torch, a scvi-tools assertion, a TypeError from a bad call
inside the package) fails the test. The examples run and their outcomes are
counted and printed at the end of the run (``fuzzing:`` in the summary);
``SCFM_FUZZ_EXAMPLES`` scales the number of examples (default 60 per property).
"""

from __future__ import annotations

import json
import os
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import scfm_adapt as sfa  # noqa: E402
from scfm_adapt.errors import SCFMInputError  # noqa: E402

N = int(os.environ.get("SCFM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=N,
    deadline=None,
    derandomize=True,  # the same examples on every run and machine: CI is reproducible
    database=None,
    suppress_health_check=list(HealthCheck),
)
SRC = str(Path(sfa.__file__).parent)

#: entry point -> Counter of outcomes ("ok" or the error class), shown in the summary
COUNTS: dict[str, Counter] = {}


def check(entry: str, fn, *args, **kwargs):
    """Call ``fn``; count the outcome; fail on an undocumented exception."""
    counts = COUNTS.setdefault(entry, Counter())
    try:
        out = fn(*args, **kwargs)
    except SCFMInputError as e:
        counts[type(e).__name__] += 1
        assert len(str(e)) > 20, f"{type(e).__name__} without a useful message: {e!r}"
        return None
    except (ValueError, TypeError, KeyError) as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        if os.environ.get("SCFM_FUZZ_VERBOSE"):
            first = args[0] if args else None
            what = f"{first!r} X={type(first.X).__name__}" if hasattr(first, "X") else ""
            print(f"{entry}: {type(e).__name__}: {str(e)[:200]} {what}")
        deliberate = frame.filename.startswith(SRC) and (frame.line or "").startswith("raise")
        if not deliberate:
            raise AssertionError(
                f"{entry}: undocumented {type(e).__name__} escaped from "
                f"{frame.filename}:{frame.lineno}: {e}"
            ) from e
        counts[type(e).__name__] += 1
        return None
    counts["ok"] += 1
    return out


# ------------------------------------------------------------------ strategies
GENES = [f"gene{j}" for j in range(40)]
DTYPES = ["float32", "float64", "int32", "int64", "uint16", "uint8"]


@st.composite
def anndatas(draw, genes=GENES):
    """AnnData with a random count matrix, format, dtype, genes and obs columns."""
    import anndata as ad

    n = draw(st.integers(0, 12))
    ops = ["same"] * 6 + ["permute", "permute", "drop", "extra", "dup", "none"]
    gene_op = draw(st.sampled_from(ops))
    names = list(genes)
    if gene_op == "permute":
        names = draw(st.permutations(names))
    elif gene_op == "drop":
        names = names[: draw(st.integers(0, len(names) - 1))]
    elif gene_op == "extra":
        names = [*names, "geneX"]
    elif gene_op == "dup":
        names = [*names[:-1], names[0]]
    elif gene_op == "none":
        names = []
    g = len(names)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, (n, g)).astype(np.float64)
    poison = draw(
        st.sampled_from(["none", "none", "none", "nan", "inf", "neg", "frac", "huge", "zero"])
    )
    if n and g:
        i, j = rng.integers(n), rng.integers(g)
        x[i, j] = {"nan": np.nan, "inf": np.inf, "neg": -3, "frac": 0.25, "huge": 1e9}.get(
            poison, x[i, j]
        )
        if poison == "zero":
            x[i] = 0
    if np.issubdtype(np.dtype(dtype), np.integer):
        with np.errstate(invalid="ignore", over="ignore"):
            x = np.nan_to_num(x, nan=0, posinf=0, neginf=0).astype(dtype)
    else:
        x = x.astype(dtype)
    fmt = draw(st.sampled_from(["csr", "csc", "dense"]))
    X = {"csr": sparse.csr_matrix, "csc": sparse.csc_matrix, "dense": np.asarray}[fmt](x)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    if n > 1 and draw(st.integers(0, 5)) == 0:
        obs.index = [*obs.index[:-1], obs.index[0]]  # duplicated obs_names
    for key, values in (("batch", ["b0", "b1", "b7"]), ("cell_type", ["type0", "type2", "typeZ"])):
        mode = draw(st.sampled_from(["known"] * 6 + ["any", "missing"]))
        if mode == "missing":
            continue
        pool = values[:2] if mode == "known" else values
        obs[key] = pd.Categorical(rng.choice(pool, n) if n else [])
    a = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=names))
    if n > 2 and draw(st.booleans()):
        a = a[: n - 1]  # a view
    return a


def _finite(out):
    arr = out.to_numpy() if isinstance(out, pd.DataFrame) else np.asarray(out)
    assert np.isfinite(arr.astype(np.float64)).all()


# ------------------------------------------------------------------ properties
@FUZZ
@given(a=anndatas())
def test_fuzz_setup_anndata(a):
    check(
        "SCFM.setup_anndata",
        sfa.model.SCFM.setup_anndata,
        a,
        batch_key="batch",
        labels_key="cell_type",
    )


@FUZZ
@given(a=anndatas())
def test_fuzz_inference(tiny_saved, a):
    m, _ = tiny_saved
    out = check("SCFM.get_latent_representation", m.get_latent_representation, a)
    if out is not None:
        _finite(out)
        assert out.shape == (a.n_obs, m.module.n_tokens * m.module.token_dim)  # tokens joined
    out = check(
        "SCFM.get_normalized_expression",
        m.get_normalized_expression,
        a,
        library_size=1e4,
        return_numpy=True,
    )
    if out is not None:
        _finite(out)


@FUZZ
@given(a=anndatas())
def test_fuzz_load_onto_data(tiny_saved, a):
    _, path = tiny_saved
    out = check("SCFM.load(adata)", sfa.model.SCFM.load, path, adata=a)
    if out is not None:
        _finite(out.get_latent_representation())


def _mostly(valid, *invalid):
    """Mostly ``valid``, sometimes one of ``invalid``. The deciding draw picks an inner value
    for ``invalid`` (hypothesis favours the bounds) and shrinks towards ``valid``."""
    return st.integers(0, 9).flatmap(lambda i: st.sampled_from(invalid) if i in (4, 7) else valid)


NAN, INF = float("nan"), float("inf")


@FUZZ
@given(
    label=_mostly(st.sampled_from(["type0", "type1", "type2"]), "typeQ", "", -2, 5),
    batch=st.one_of(st.none(), _mostly(st.sampled_from(["b0", "b1"]), "bZ", 3)),
    n=_mostly(st.integers(1, 40), None, -2, 0),
    scale=_mostly(st.floats(-2, 10), NAN, INF, "x"),
    n_steps=_mostly(st.integers(1, 12), 0, -1, 2.5),
    sampler=_mostly(st.sampled_from(["ddim", "ddpm"]), "euler"),
    library=st.one_of(st.none(), _mostly(st.floats(1, 1e5), -10.0, 0.0, NAN)),
)
def test_fuzz_generate(tiny_saved, label, batch, n, scale, n_steps, sampler, library):
    m, _ = tiny_saved
    conditions = {k: v for k, v in (("cell_type", label), ("batch", batch)) if v is not None}
    out = check(
        "SCFM.generate",
        m.generate,
        conditions or None,
        n_samples=n,
        guidance_scale=scale,
        n_steps=n_steps,
        sampler=sampler,
        library_size=library,
    )
    if out is not None:
        x = out.X.toarray() if sparse.issparse(out.X) else out.X
        _finite(x)
        assert (x >= 0).all()


@FUZZ
@given(
    name=st.sampled_from(["config.json", "model.safetensors"]),
    cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
    forge=st.booleans(),
)
def test_fuzz_damaged_checkpoint(tiny_saved, tmp_path_factory, name, cut, flips, forge):
    """Truncated or bit-flipped files (with the manifest forged to match, or not) load
    only if nothing changed, else raise CheckpointError."""
    import shutil

    from scfm_adapt.model.base import _checkpoint as _io

    _, path = tiny_saved
    dst = tmp_path_factory.mktemp("dmg") / "m"
    shutil.copytree(path, dst)
    f = dst / name
    data = bytearray(f.read_bytes())
    if cut is not None:
        data = data[: int(len(data) * cut)]
    for pos, xor in flips:
        if data:
            data[int(pos * len(data))] ^= xor
    f.write_bytes(bytes(data))
    if forge and name == "model.safetensors":  # a forger also fixes the manifest
        cfg = json.loads((dst / "config.json").read_text())
        cfg["files"][name] = _io._file_record(f)
        cfg["config_sha256"] = _io._config_digest(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    # loads (the bytes may be unchanged, or forged weights are just other numbers) or
    # raises CheckpointError; nothing else
    check("SCFM.load(damaged)", sfa.model.SCFM.load, dst)


@FUZZ
@given(
    a=st.integers(0, 9).flatmap(lambda i: anndatas() if i in (3, 6, 8) else st.just(None)),
    target=st.sampled_from(
        [{"batch": "b1"}, {"batch": "b9"}, {"cell_type": "type2"}, {}, {"x": 1}]
    ),
    n_steps=st.integers(-1, 6),
    strength=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
)
def test_fuzz_counterfactual(tiny_saved, a, target, n_steps, strength):
    m, _ = tiny_saved
    # a is mostly None (the training cells): the arguments get fuzzed on
    # valid cells too, not only behind an input error
    out = check(
        "SCFM.counterfactual",
        m.counterfactual,
        a,
        target,
        indices=None if a is not None else np.arange(24),
        n_steps=n_steps,
        strength=strength,
    )
    if out is not None:
        _finite(out.X.toarray() if sparse.issparse(out.X) else out.X)


@pytest.mark.slow
def test_fuzzing_at_depth(tmp_path):
    """Every fuzzer above again, with ``SCFM_FUZZ_DEEP_EXAMPLES`` (default 300) examples per
    entry point instead of the default run's ``N``, in a fresh process."""
    import subprocess
    import sys

    deep = os.environ.get("SCFM_FUZZ_DEEP_EXAMPLES", "300")
    env = {**os.environ, "SCFM_FUZZ_EXAMPLES": deep}
    here = Path(__file__)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
         "-k", "not test_fuzzing_at_depth", "--rootdir", str(here.parents[2])],
        env=env, capture_output=True, text=True, cwd=here.parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no undocumented exception escaped" in proc.stdout

"""The tutorials cannot rot: the committed notebooks hold their outputs, and they run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9]*.ipynb"))
FASTEST = TUTORIALS / "01_pretrain_annotate_pbmc.ipynb"  # built-in data, about 75 s


def _executor():
    spec = importlib.util.spec_from_file_location("tutorial_execute", TUTORIALS / "execute.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def test_the_six_tutorials_are_committed_executed_and_error_free():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code, path.name
        unrun = [i for i, c in enumerate(code) if c["execution_count"] is None]
        assert not unrun, f"{path.name}: code cells {unrun} were not executed"
        counts = [c["execution_count"] for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name}: run out of order"
        errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"]), (
            f"{path.name} shows no figure"
        )


@pytest.mark.slow
def test_the_fastest_tutorial_runs_end_to_end():
    pytest.importorskip("nbclient")
    nb, _ = _executor().execute(FASTEST, write=False)
    text = _outputs(nb)
    assert "logistic regression on HVGs" in text and "SCFM + LoRA annotator" in text
    assert "reloaded model and annotator reproduce" in text  # the notebook's own asserts ran


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("path", NOTEBOOKS[1:], ids=lambda p: p.stem)
def test_every_tutorial_runs(path, shared_data):
    pytest.importorskip("nbclient")
    nb, _ = _executor().execute(path, write=False)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]

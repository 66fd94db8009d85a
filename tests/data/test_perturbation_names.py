"""sfa.data's perturbation-name parser, shared by the models and the baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scfm_adapt as sfa
from scfm_adapt.errors import SCFMInputError

D = sfa.data


def test_split_and_canonical_names():
    assert D.split_perturbation(" B + A ", "ctrl") == ["A", "B"]
    assert D.split_perturbation("A+ctrl++A", "ctrl") == ["A", "A"]  # duplicates kept
    assert D.split_perturbation("ctrl", "ctrl") == []
    assert D.canonical_perturbation("B+A", "ctrl") == "A+B"
    assert D.canonical_perturbation("ctrl+ctrl", "ctrl") == "ctrl"
    assert D.canonical_perturbation("B_A", "ctrl", delimiter="_") == "A_B"
    assert D.split_perturbation("B+A", "ctrl", delimiter="") == ["B+A"]  # no delimiter


def test_context_labels():
    obs = pd.DataFrame({"cell_type": ["T", "B"], "donor": [1, 2]})
    assert list(D.context_labels(obs, ["cell_type", "donor"])) == ["T | 1", "B | 2"]
    assert list(D.context_labels(obs, [])) == ["", ""]
    with pytest.raises(KeyError, match="tissue"):
        D.context_labels(obs, ["tissue"])


def test_parse_doses():
    assert D.parse_doses(None, 2, "+") == [1.0, 1.0]
    assert D.parse_doses(float("nan"), 1, "+") == [1.0]
    assert D.parse_doses("0.5", 2, "+") == [0.5, 0.5]  # one number for every part
    assert D.parse_doses("1+0.5", 2, "+") == [1.0, 0.5]
    assert D.parse_doses(np.array([2, 3]), 2, "+") == [2.0, 3.0]
    for bad, match in (("x", "not a number"), ("1+2+3", "3 values"), ("-1", "non-negative")):
        with pytest.raises(SCFMInputError, match=match):
            D.parse_doses(bad, 2, "+")


def test_parts_and_doses():
    # sorted (part, dose) pairs: B's dose 1 goes with B
    assert D.parts_and_doses("B+A", "1+0.5", "ctrl") == (("A", "B"), (0.5, 1.0))
    # doses are read in the name's order, control parts included, then dropped with them
    assert D.parts_and_doses("A+ctrl", "2+1", "ctrl") == (("A",), (2.0,))
    assert D.parts_and_doses("A", None, "ctrl") == (("A",), (1.0,))
    assert D.parts_and_doses("ctrl", "5", "ctrl") == ((), ())
    assert D.parts_and_doses("ctrl+", None, "ctrl") == ((), ())
    with pytest.raises(SCFMInputError, match="values"):
        D.parts_and_doses("A+B", "1+2+3", "ctrl")


def test_canonical_names():
    assert D.canonical_perturbation("B+A", "ctrl") == "A+B"
    assert D.canonical_perturbation("A+ctrl", "ctrl") == "A"
    assert D.canonical_perturbation("ctrl", "ctrl") == "ctrl"
    assert D.split_perturbation(" B + A ", "ctrl") == ["A", "B"]

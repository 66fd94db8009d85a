"""Sphinx configuration: myst-nb pages and notebooks, autosummary API reference.

Build: ``pip install -c constraints.txt ".[doc]" && sphinx-build -W -b html docs docs/_build/html``.
The tutorials are executed and committed with their outputs (``tutorials/execute.py``); the
build renders them as they are and never runs them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import scfm_adapt  # noqa: E402

project = "scfm_adapt"
author = "scfm_adapt developers"
copyright = "2026, scfm_adapt developers"
version = release = scfm_adapt.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

# The notebooks live in tutorials/ (beside the code they exercise); the site gets a copy.
_TUTORIALS = HERE / "tutorials"
shutil.rmtree(_TUTORIALS, ignore_errors=True)  # no stale copies of removed notebooks
_TUTORIALS.mkdir()
for _nb in sorted((ROOT / "tutorials").glob("[0-9]*.ipynb")):
    shutil.copy2(_nb, _TUTORIALS / _nb.name)


# autosummary writes its stub pages as .rst
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/_*.md", "Thumbs.db", ".DS_Store", "jupyter_execute"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_merge_streams = True

autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Heavy dependencies are imported for real: the API pages show the real signatures.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_theme = "sphinx_book_theme"
html_title = "scfm_adapt"
html_static_path = ["_static"]
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}

"""Sphinx configuration of ferjax's documentation (MyST Markdown pages, API from docstrings).

Build it strictly, as the test suite does (tests/test_docs.py):

  pip install -e '.[docs]'
  sphinx-build -W --keep-going -b html docs docs/_build/html

then open docs/_build/html/index.html.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # The package itself, when it is not installed.

project = "ferjax"
author = "the ferjax authors"
copyright = "2026, the ferjax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}  # .rst: the API pages
root_doc = "index"
exclude_patterns = ["_build"]

# Links to a page's section (`training.md#resume`) resolve to its heading, GitHub-style.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# The API reference: one page per module, written at build time from the docstrings.
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"  # Signatures stay readable; the docstrings say what goes in.

html_theme = "alabaster"
html_title = "ferjax"
html_static_path = []


# ferjax's docstrings are plain prose (indented lists, formulas, `names` in backticks), not
# reStructuredText: each is shown as written, in a literal block, so any docstring builds.
def _docstring_as_written(app, what, name, obj, options, lines):
  if lines:
    lines[:] = ["::", ""] + ["   " + line for line in lines] + [""]


def setup(app):
  app.connect("autodoc-process-docstring", _docstring_as_written)

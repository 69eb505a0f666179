"""Sphinx configuration of the fused_ce documentation site: the hand-written pages of docs/
(markdown, read by myst-parser) and an API reference made from the docstrings (autodoc, with
napoleon for their Google/torch-style ``Args:``/``Returns:``/``Shape:`` sections).

    make docs        # or: python -m sphinx -W --keep-going -b html docs out/docs

Built with warnings as errors; tests/test_docs.py runs the same build.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The checkout's fused_ce, whether or not it is installed.
sys.path.insert(0, str(ROOT))
# The docs import fused_ce to read its docstrings; they need no GPU and no Triton interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0")

project = "fused_ce"
author = "the fused_ce authors"
copyright = "the fused_ce authors, Apache-2.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: `page.md#a-heading` links resolve to the heading's anchor.
myst_heading_anchors = 3

# The docstrings: torch's section names, signatures in the order written, type hints in the
# signature (not repeated in the description).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Shape"]  # free text and bullets, as torch writes it
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "alabaster"
html_title = "fused_ce"
html_static_path: list[str] = []

# The pages link each committed benchmark report by its path in the repository (as GitHub
# shows it); the site has the reports on its results page, one section per card.
_REPORT_LINK = re.compile(r"\]\(\.\./bench/results/([\w-]+)/bench\.md\)")


def _link_reports_to_results_page(app, docname: str, source: list[str]) -> None:
    source[0] = _REPORT_LINK.sub(r"](results.md#\1)", source[0])


def setup(app) -> dict[str, bool]:
    app.connect("source-read", _link_reports_to_results_page)
    return {"parallel_read_safe": True}

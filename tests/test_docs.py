"""The documentation site (docs/conf.py: the pages of docs/ and an API reference from the
docstrings) builds with no warning, as `make docs` builds it: Sphinx runs with ``-W``, so a
docstring that does not parse, a broken link between pages or a page missing from the index
fails here. The API pages show the signatures the code has, and the benchmark plots are in."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fused_ce
import fused_ce.nn

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = [m for m in ("sphinx", "myst_parser") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"the docs build needs {missing}: pip install -e '.[docs]' (make setup does)")
    out = tmp_path_factory.mktemp("docs")
    command = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["docs", str(out / "html"), "-d", str(out / "doctrees")]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr[-4000:]
    return out / "html"


def _text(page: Path) -> str:
    return re.sub(r"<[^>]+>", "", page.read_text())


@pytest.mark.parametrize(
    ("page", "function"),
    [
        ("api/functional.html", fused_ce.softmax_cross_entropy),
        ("api/functional.html", fused_ce.sigmoid_binary_cross_entropy),
        ("api/linear.html", fused_ce.linear_cross_entropy),
        ("api/linear.html", fused_ce.linear_binary_cross_entropy_with_logits),
        ("api/nn.html", fused_ce.nn.LinearCrossEntropyLoss),
    ],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_api_pages_show_the_code_signatures(site, page, function):
    text = _text(site / page)
    shown = re.findall(rf"{function.__name__}\(([^)]*)\)", text)
    assert shown, f"{function.__name__} has no signature on {page}"
    params = [p for p in inspect.signature(function).parameters if p != "self"]
    # Every parameter, in the code's order, in one of the signatures shown.
    assert any(
        [name for name in re.findall(r"(\w+)(?=:|=| =)", sig) if name in params] == params
        for sig in shown
    ), (params, shown)


def test_pages_and_benchmark_plots_are_in(site):
    pages = {p.stem for p in (REPO / "docs").glob("*.md")}
    built = {p.stem for p in site.glob("*.html")}
    assert pages <= built, pages - built
    images = {p.name for p in (site / "_images").iterdir()}
    assert {"ce_time.png", "frac_bw.png", "majority_bits_weights.png"} <= images, images
    results = (site / "results.html").read_text()
    assert results.count('src="_images/ce_time') == 2  # the H200 and the CPU reports

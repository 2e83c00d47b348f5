"""The documentation site builds with ``mkdocs build --strict`` (warnings are errors).

Strict mode turns broken links, missing nav pages and docstrings that mkdocstrings cannot
parse into failures, so this test keeps the site and the docstrings honest. It needs the
docs packages (in the ``test`` and ``docs`` extras); without MkDocs it is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_MISSING = [
    m
    for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    if importlib.util.find_spec(m.split(".")[0]) is None
]


@pytest.mark.skipif(
    bool(_MISSING),
    reason=f"docs packages not installed ({', '.join(_MISSING)}): "
    'pip install -c constraints.txt -e ".[docs]"',
)
def test_docs_build_strict(tmp_path: Path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    expected = [
        "index.html",
        "concepts/index.html",
        "kernels/index.html",
        "data_layout/index.html",
        "uncertainty/index.html",
        "cli/index.html",
        "performance/index.html",
        "tutorials/01_quickstart/index.html",
        "tutorials/03_validating_the_sampler/index.html",
        "diagnostics/coverage/index.html",
        "diagnostics/coverage_vs_ess.png",
        "api/sampling/index.html",
        "api/estimation/index.html",
    ]
    missing = [p for p in expected if not (site / p).is_file()]
    assert not missing, f"pages missing from the built site: {missing}"
    # API pages are generated from docstrings, not left empty.
    api = (site / "api" / "sampling" / "index.html").read_text(encoding="utf-8")
    assert "LocalPosterior" in api and "sample_nuts" in api
    # The step-size convention page states the conversion.
    kernels = (site / "kernels" / "index.html").read_text(encoding="utf-8")
    assert "Welling" in kernels and "correction term" in kernels
    # Tutorials are rendered from their notebooks, outputs included.
    quick = (site / "tutorials" / "01_quickstart" / "index.html").read_text(encoding="utf-8")
    assert "data:image/png;base64" in quick

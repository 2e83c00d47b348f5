"""The tutorials run, assert their own numbers, and their notebooks are not stale.

Each ``tutorials/NN_*.py`` is executed as a plain script in fast mode
(``BAYES_SUSC_FAST=1``): its cells assert the numbers its prose talks about, so a
wrong number fails here. No jupyter packages are needed. The paired ``.ipynb`` (built by
``tutorials/make_notebooks.py``) must hold the same code cells as the ``.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
_CELL = re.compile(r"^# %%(.*)$")


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_tutorials_exist():
    assert TUTORIALS, "no tutorials/NN_*.py found"


@pytest.mark.parametrize("path", TUTORIALS, ids=_ids(TUTORIALS))
def test_tutorial_runs_in_fast_mode(path: Path):
    env = {**os.environ, "BAYES_SUSC_FAST": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"{path.name} failed (exit {proc.returncode}):\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )


def _py_code_cells(path: Path) -> list[str]:
    """Code cells of a jupytext percent-format script (the header comment excluded)."""
    cells: list[tuple[bool, list[str]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _CELL.match(line)
        if m:
            cells.append(("[markdown]" not in m.group(1) and "[md]" not in m.group(1), []))
        elif cells:
            cells[-1][1].append(line)
    return ["\n".join(lines).strip() for is_code, lines in cells if is_code]


def _ipynb_code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = cell["source"]
            out.append(("".join(src) if isinstance(src, list) else src).strip())
    return out


@pytest.mark.parametrize("path", TUTORIALS, ids=_ids(TUTORIALS))
def test_notebook_matches_script(path: Path):
    nb_path = path.with_suffix(".ipynb")
    regen = "regenerate it with `python tutorials/make_notebooks.py`"
    assert nb_path.exists(), f"{nb_path.name} is missing: {regen}"
    py_cells, nb_cells = _py_code_cells(path), _ipynb_code_cells(nb_path)
    assert len(py_cells) == len(nb_cells), (
        f"{nb_path.name} has {len(nb_cells)} code cells, {path.name} has {len(py_cells)}: {regen}"
    )
    for k, (a, b) in enumerate(zip(py_cells, nb_cells)):
        assert a == b, f"code cell {k} of {nb_path.name} differs from {path.name}: {regen}"


@pytest.mark.parametrize("path", TUTORIALS, ids=_ids(TUTORIALS))
def test_notebook_is_executed_and_small(path: Path):
    nb_path = path.with_suffix(".ipynb")
    if not nb_path.exists():
        pytest.skip("notebook missing (reported by test_notebook_matches_script)")
    assert nb_path.stat().st_size < 1_000_000, f"{nb_path.name} is over 1 MB"
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), f"{nb_path.name} is not fully executed"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{nb_path.name} carries an error output"

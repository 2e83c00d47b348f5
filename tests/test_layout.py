"""Boundaries of the package (issue 17): the numpy-only statistics import no torch-side module, and
result files follow the process umask."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import bayes_susc
from bayes_susc.storage import atomic_write

_STATISTICS = ("susceptibility", "convergence", "response_matrix")


@pytest.mark.parametrize("module", _STATISTICS)
def test_statistics_import_no_torch_module(module: str) -> None:
    """The statistics import no torch, and no module that does, at any depth of the file
    (the package root still imports the sampler; the stage modules themselves do not)."""
    path = Path(bayes_susc.__file__).parent / f"{module}.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    torch_side = {"torch", "bayes_susc.sampling", "bayes_susc.posterior", "bayes_susc.kernels"}
    assert not {m for m in imported if m.split(".")[0] == "torch" or m in torch_side}


def test_divergence_warning_is_one_class_everywhere() -> None:
    import bayes_susc
    from bayes_susc import errors, sampling, susceptibility

    assert bayes_susc.DivergenceWarning is errors.DivergenceWarning
    assert sampling.DivergenceWarning is errors.DivergenceWarning
    assert susceptibility.DivergenceWarning is errors.DivergenceWarning


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_follows_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "result.json", lambda tmp: Path(tmp).write_text("{}"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

"""Boundaries of the package (issue 17): the numpy-only statistics import no torch, and
result files follow the process umask."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bayes_susc.storage import atomic_write


@pytest.mark.parametrize(
    "module",
    ["bayes_susc.susceptibility", "bayes_susc.convergence", "bayes_susc.response_matrix"],
)
def test_statistics_import_no_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False", f"{module} imports torch"


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

"""Boundaries of the package (issue 17): the import-linter contracts of pyproject.toml, no
private name crossing modules, the statistics and the command line's help without torch,
and result files that follow the process umask."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

import bayes_susc
from bayes_susc.storage.draws import atomic_write

_STATISTICS = ("susceptibility", "convergence", "response_matrix")


@pytest.mark.parametrize("module", _STATISTICS)
def test_statistics_import_no_torch_module(module: str) -> None:
    """The statistics import no torch, and no module that does, at any depth of the file
    (the package root still imports the sampler; the stage modules themselves do not)."""
    path = Path(bayes_susc.__file__).parent / "estimation" / f"{module}.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    torch_side = {
        "torch",
        "bayes_susc.sampling.driver",
        "bayes_susc.target.posterior",
        "bayes_susc.kernels",
    }
    assert not {m for m in imported if m.split(".")[0] == "torch" or m in torch_side}


def test_divergence_warning_is_one_class_everywhere() -> None:
    import bayes_susc
    from bayes_susc import errors
    from bayes_susc.estimation import susceptibility
    from bayes_susc.sampling import driver as sampling

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


_ROOT = Path(__file__).resolve().parents[1]
_PACKAGE = _ROOT / "bayes_susc"


def test_import_linter_contracts_hold() -> None:
    """Layers in data-flow order; no cli, typer or demo below them; kernels without model
    code; statistics and storage without torch (the contracts in pyproject.toml)."""
    cwd = os.getcwd()
    os.chdir(_ROOT)
    try:
        assert lint_imports(config_filename="pyproject.toml", no_cache=True, no_logo=True) == 0
    finally:
        os.chdir(cwd)


def _module_name(path: Path) -> str:
    parts = path.relative_to(_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_another_modules_private_name() -> None:
    crossings = []
    for path in sorted(_PACKAGE.rglob("*.py")):
        here = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bayes_susc"):
                for alias in node.names:
                    private = alias.name.startswith("_") or any(
                        part.startswith("_") for part in node.module.split(".")
                    )
                    if private and node.module != here:
                        crossings.append(f"{here}: from {node.module} import {alias.name}")
    assert crossings == []


def _fresh(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_ROOT
    ).stdout.strip()


def test_statistics_and_cli_help_load_no_torch() -> None:
    """``import bayes_susc.estimation.*`` and ``bayes-susc --help`` stay torch-free, which
    is what makes the help answer at once (0.24 s against 5 s before the lazy root)."""
    code = (
        "import sys\n"
        "import bayes_susc.estimation.susceptibility, bayes_susc.estimation.response_matrix\n"
        "from typer.testing import CliRunner\n"
        "from bayes_susc.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "print(result.exit_code, 'torch' in sys.modules, 'run' in result.output)"
    )
    assert _fresh(code) == "0 False True"


def test_root_names_load_on_first_use() -> None:
    assert sorted(bayes_susc.__all__) == sorted(bayes_susc._EXPORTS)
    for name in bayes_susc.__all__:
        value = getattr(bayes_susc, name)
        assert value.__module__.startswith(bayes_susc._EXPORTS[name].rsplit(".", 1)[0])
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        bayes_susc.nonexistent  # noqa: B018


def test_cli_help_is_plain_text() -> None:
    """No reST markup (double backquotes, :func: roles) in any command's help."""
    from typer.testing import CliRunner

    from bayes_susc.cli import app

    runner = CliRunner()
    for command in ("", "demo", "run", "report", "calibrate"):
        args = [command, "--help"] if command else ["--help"]
        out = runner.invoke(app, args).output
        assert "``" not in out and ":func:" not in out and ":class:" not in out, command


def test_sample_keywords_are_samples_own() -> None:
    """The executors tell run settings from kernel hyperparameters by this list; it must
    be exactly sample()'s keywords (besides posterior, kernel and **kernel_kwargs)."""
    import inspect

    from bayes_susc.sampling.driver import SAMPLE_KEYWORDS, sample

    params = inspect.signature(sample).parameters
    own = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    assert own - {"posterior", "kernel"} == SAMPLE_KEYWORDS


def test_kernel_hyperparameter_names() -> None:
    from bayes_susc.kernels.base import kernel_hyperparameter_names, make_kernel

    assert kernel_hyperparameter_names("sgld") == ("step_size",)
    assert kernel_hyperparameter_names("mala") == ("step_size",)
    for name in ("sghmc", "sgnht", "psgld"):
        assert set(kernel_hyperparameter_names(name)) == set(make_kernel(name).hyperparameters())
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        kernel_hyperparameter_names("nope")

"""The demo command end to end, in its quick configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from bayes_susc import get_group, load
from bayes_susc.cli import app
from bayes_susc.demo.preset import DEMO_CHECKPOINT
from bayes_susc.estimation.response_matrix import load_response_matrix


def test_demo_quick_writes_results_and_resumes(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--quick", "--no-progress"])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "components").glob("*.nc"))
    assert [f.stem for f in files] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    data = load(files[0])
    post = get_group(data, "posterior")
    assert post["phi"].shape == (4, 20)
    # 4 probe sequences of 64 bytes -> 63 predicted tokens each.
    assert post["probe_loss"].shape == (4, 20, 4 * 63)
    assert set(post["dataset"].values) <= {"code", "prose"}
    assert np.isfinite(post["probe_loss"].values).all()
    matrix = load_response_matrix(tmp_path / "response_matrix.nc")
    assert matrix["chi"].dims == ("probe", "component")
    assert matrix["chi"].shape == (4 * 63, 4)
    counts = summary["response_matrix"]["status_counts"]
    assert sum(counts.values()) == 4 * 63 * 4
    assert counts == {
        str(k): int(v) for k, v in zip(*np.unique(matrix["status"].values, return_counts=True))
    }
    assert summary["report"] == str(tmp_path / "report.html")
    assert result.output.rstrip().splitlines()[-1] == f"report: {tmp_path / 'report.html'}"
    # Role scores of all 16 heads of the shipped model, though quick samples only 4.
    assert set(summary["head_roles"]) == {f"L{lay}H{h}" for lay in range(2) for h in range(8)}
    assert summary["settings"]["heads"] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    # The run folder holds a byte copy of the shipped checkpoint (nothing trained).
    assert (tmp_path / "model.safetensors").read_bytes() == DEMO_CHECKPOINT.read_bytes()
    for name in ("heatmap", "pca_scatter", "pca_loadings", "explained_variance"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = runner.invoke(app, ["demo", "--out", str(tmp_path), "--quick", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # resumed, nothing recomputed
    resumed = json.loads((tmp_path / "summary.json").read_text())
    # The resume reused all four heads and says so; every other figure is the same.
    heads = ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert resumed.pop("computed_this_run") == [] and summary.pop("computed_this_run") == heads
    assert resumed.pop("reused") == heads and summary.pop("reused") == []
    assert resumed == summary
    assert "reusing 4 finished components of 4" in again.output
    assert "sampled now: 0, reused from the run folder: 4" in again.output


# The subprocesses run single-threaded: float reductions then do not depend on how many
# threads the machine offers, so two runs with one seed give bit-identical results.
_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _demo_command(out) -> list[str]:
    return [sys.executable, "-m", "bayes_susc.cli", "demo", "--out", str(out), "--quick"]


def _children_of(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (Linux /proc)."""
    return [p for p in _live_processes() if _stat(p)[1] == pid]


def _stat(pid: int) -> tuple[str, int]:
    """(state letter, parent pid) of a process, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def _live_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _stat(int(entry.name))[0] != "Z":  # a zombie has exited already
                    pids.append(int(entry.name))
            except (OSError, ValueError):
                continue  # ended while listed
    return pids


def test_killed_demo_resumes_to_the_uninterrupted_result(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    proc = subprocess.Popen(
        _demo_command(killed) + ["--no-progress"],
        env=_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "components").glob("*.nc")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no component file after 120 s"
            time.sleep(0.02)
        workers = _children_of(proc.pid)
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    # Its worker processes end with it (they would otherwise wait for jobs for ever).
    if (os.cpu_count() or 1) > 1:
        assert workers, "on several cores the demo samples on worker processes by default"
    deadline = time.monotonic() + 15
    while set(workers) & set(_live_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(workers) & set(_live_processes())
    done = sorted(p.name for p in (killed / "components").glob("*.nc"))
    assert 1 <= len(done) < 4, done  # killed mid-run: some heads finished, not all
    assert not (killed / "response_matrix.nc").exists()
    first = {p: (killed / "components" / p).stat().st_mtime_ns for p in done}

    for out in (killed, reference):
        run = subprocess.run(
            _demo_command(out) + ["--no-progress"], env=_ENV, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
    # Finished heads were not recomputed.
    assert {p: (killed / "components" / p).stat().st_mtime_ns for p in done} == first
    a = load_response_matrix(killed / "response_matrix.nc")
    b = load_response_matrix(reference / "response_matrix.nc")
    for name in ("chi", "ci_low", "ci_high", "status"):
        xr.testing.assert_equal(a[name], b[name])
    xr.testing.assert_identical(a, b)
    # No partial or temporary files remain; both folders hold the same files.
    left = [p for p in killed.rglob("*") if p.suffix == ".tmp" or ".tmp" in p.name]
    assert left == []

    def names(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*"))

    assert names(killed) == names(reference)


@pytest.mark.slow
def test_demo_on_two_worker_processes_equals_the_in_process_run(tmp_path):
    """`--workers 2`: the heads run side by side on worker processes (one thread each)
    and give the in-process single-threaded run's results, bit for bit.

    Slow (21 s), and the same pipeline path (ProcessExecutor through pipeline.run) is
    checked bit for bit in the default suite by
    tests/test_executor.py::test_run_config_process_executor_matches_local and
    tests/test_bench_vs_devinterp.py::test_our_side_on_two_workers_gives_the_in_process_matrix.
    """
    from bayes_susc.demo.preset import DemoSettings, run_demo

    workers_dir, local_dir = tmp_path / "workers", tmp_path / "local"
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--out",
            str(workers_dir),
            "--quick",
            "--no-progress",
            "--workers",
            "2",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each worker ran with
    try:
        run_demo(local_dir, DemoSettings.quick(), progress=False, report=False)
    finally:
        torch.set_num_threads(threads)
    for head in ("L0H0", "L0H1", "L1H0", "L1H1"):
        a = get_group(load(workers_dir / "components" / f"{head}.nc"), "posterior")
        b = get_group(load(local_dir / "components" / f"{head}.nc"), "posterior")
        xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    a = load_response_matrix(workers_dir / "response_matrix.nc")
    b = load_response_matrix(local_dir / "response_matrix.nc")
    for name in ("chi", "ci_low", "ci_high", "status"):
        xr.testing.assert_equal(a[name], b[name])

"""The bit-identity check of the redesign (python -m diagnostics.equivalence) can fail: it
finds one changed value, a changed dtype, and a result file the new tree no longer writes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # diagnostics/ is not installed
from diagnostics.equivalence import compare_file, compare_runs  # noqa: E402


def _write(path, values, dtype="float64") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = xr.Dataset(
        {"chi": (("probe",), np.asarray(values, dtype=dtype))},
        coords={"probe": np.arange(len(values))},
        attrs={"created_at": str(path)},  # volatile: not compared
    )
    ds.to_netcdf(path, engine="netcdf4")


def test_identical_files_pass_and_one_ulp_fails(tmp_path):
    x = np.array([0.1, np.nan, -2.5])
    _write(tmp_path / "a.nc", x)
    _write(tmp_path / "b.nc", x)
    problems, attrs, count = compare_file(tmp_path / "a.nc", tmp_path / "b.nc")
    assert (problems, attrs, count) == ([], [], 2)  # chi and the probe coordinate
    _write(tmp_path / "c.nc", [0.1, np.nan, np.nextafter(-2.5, 0.0)])
    problems, _, _ = compare_file(tmp_path / "a.nc", tmp_path / "c.nc")
    assert problems == ["/chi: values differ"]
    _write(tmp_path / "d.nc", x, dtype="float32")
    problems, _, _ = compare_file(tmp_path / "a.nc", tmp_path / "d.nc")
    assert problems == ["/chi: ('probe',) float64 vs ('probe',) float32"]


def test_a_file_missing_from_the_new_run_fails(tmp_path, capsys):
    for side in ("before", "after"):
        _write(tmp_path / side / "components" / "L0H0.nc", [1.0, 2.0])
    _write(tmp_path / "before" / "response_matrix.nc", [3.0])
    _write(tmp_path / "after" / "analyses" / "pca.nc", [4.0])
    assert not compare_runs(tmp_path / "before", tmp_path / "after")
    out = capsys.readouterr().out
    assert "MISSING    response_matrix.nc" in out and "new        analyses/pca.nc" in out
    (tmp_path / "before" / "response_matrix.nc").unlink()
    assert compare_runs(tmp_path / "before", tmp_path / "after")

"""The demo command end to end, in its quick configuration."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from bayes_susc import get_group, load
from bayes_susc.cli import app
from bayes_susc.response_matrix import load_response_matrix


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
    for name in ("heatmap", "pca_scatter", "pca_loadings", "explained_variance"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = runner.invoke(app, ["demo", "--out", str(tmp_path), "--quick", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # resumed, nothing recomputed
    assert json.loads((tmp_path / "summary.json").read_text()) == summary

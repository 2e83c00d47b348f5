"""The HTML report of a quick demo run: sections, embedded PNGs, escaping, rebuilds."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from bayes_susc.cli import app
from bayes_susc.demo.preset import DemoSettings, run_demo
from bayes_susc.estimation.response_matrix import load_response_matrix, save_response_matrix
from bayes_susc.report.html import SECTIONS, induction_separation, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_IMG = re.compile(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
_GENERATED = re.compile(r"Generated: [^<]*<")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(out, DemoSettings.quick(), progress=False)
    assert summary["report"] == str(out / "report.html")
    return out


def test_report_sections_and_embedded_pngs(run_dir):
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    positions = [text.index(f"<h2>{h}</h2>") for h in SECTIONS]
    assert positions == sorted(positions)  # every section, in order
    images = _IMG.findall(text)
    # heat map, PCA scores, loadings, pattern heat map, clusters, scree, traces
    assert len(images) == 7
    # The pattern section lists every pattern with its token count (rules tested in
    # tests/test_patterns.py); the quick demo's 252 tokens have no comment or digit.
    assert (run_dir / "analyses" / "patterns.nc").is_file()
    assert (
        "induction_continuation"
        in json.loads((run_dir / "summary.json").read_text())["patterns"]["num_tokens"]
    )
    for data in images:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert 'src="figures/' not in text  # self-contained
    for name in ("L0H0", "L0H1", "L1H0", "L1H1"):
        assert text.count(f'<td class="l">{name}</td>') >= 3  # status, convergence, roles
    for name in ("previous_token", "induction", "duplicate_token", "first_token", "self"):
        assert f"<th>{name}</th>" in text
    assert "⟦" in text  # tokens in context


def test_token_text_is_escaped(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    matrix = load_response_matrix(tmp_path / "response_matrix.nc")
    planted = np.array(["<b>&"] * matrix.sizes["probe"], dtype=object)
    save_response_matrix(
        matrix.assign_coords(token=("probe", planted)), tmp_path / "response_matrix.nc"
    )
    # The cluster examples come from the saved PCA (the report recomputes nothing).
    pca_path = tmp_path / "analyses" / "pca.nc"
    with xr.open_dataset(pca_path, engine="netcdf4") as f:
        res = f.load()
    res.assign_coords(token=("probe", planted)).to_netcdf(pca_path, engine="netcdf4")
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "⟦&lt;b&gt;&amp;⟧" in text
    assert "<b>" not in text and "⟦<" not in text


def test_cli_report_rebuilds_identically(run_dir):
    before = (run_dir / "report.html").read_text(encoding="utf-8")
    figures = {p.name: p.read_bytes() for p in (run_dir / "figures").glob("*.png")}
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"report: {run_dir / 'report.html'}"
    after = (run_dir / "report.html").read_text(encoding="utf-8")
    assert _GENERATED.search(before) and _GENERATED.search(after)
    assert _GENERATED.sub("", before) == _GENERATED.sub("", after)
    assert {p.name: p.read_bytes() for p in (run_dir / "figures").glob("*.png")} == figures


def test_cli_report_without_results(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no response_matrix.nc" in result.output
    with pytest.raises(FileNotFoundError, match="no response_matrix.nc"):
        write_report(tmp_path)


def test_induction_separation():
    comps = ["a", "b", "c", "d"]
    loadings = xr.DataArray(
        [[0.9, 0.25], [0.8, -0.5], [0.1, 0.3], [0.0, 0.2]],
        dims=("component", "pc"),
        coords={"component": comps, "pc": [1, 2]},
    )
    induction = xr.DataArray([0.7, 0.6, 0.1, 0.05], dims="component", coords={"component": comps})
    sep = induction_separation(loadings, induction, n_top=2)
    # PC1: top {a, b} at >= 0.8, rest <= 0.1: margin 0.7 over range 0.9.
    assert sep.sel(pc=1) == pytest.approx(0.7 / 0.9)
    # PC2: a = 0.25 lies between d = 0.2 and c = 0.3: no sign of PC2 separates {a, b}.
    assert sep.sel(pc=2) < 0
    # Sign of a PC is arbitrary: flipping it changes nothing.
    assert np.allclose(induction_separation(-loadings, induction, 2), sep)
    with pytest.raises(ValueError, match="n_top"):
        induction_separation(loadings, induction, n_top=4)


def test_report_opens_in_headless_chromium(run_dir, tmp_path):
    """Debian's chromium (installed by .ci/run) renders the report: no page or console
    errors, no failed requests, every embedded figure decoded to a non-empty image."""
    pytest.importorskip("playwright", reason="pip install playwright")
    from pathlib import Path

    from bayes_susc.report.html import open_in_browser

    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "report.png"
    seen = open_in_browser(run_dir / "report.html", screenshot=shot)
    assert seen["errors"] == []
    assert seen["title"] == "bayes_susc report"
    assert len(seen["images"]) == 7
    assert all(width > 100 for _, width in seen["images"]), seen["images"]
    assert shot.read_bytes().startswith(PNG_MAGIC)

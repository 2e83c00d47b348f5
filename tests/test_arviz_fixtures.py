"""A run saved under one ArviZ generation loads, estimates and reports under the other.

``tests/data/arviz0_run.nc`` was saved by ``bayes_susc.save`` under Python 3.11 with
ArviZ 0.23 (an ``InferenceData``), ``arviz1_run.nc`` under Python 3.12 with ArviZ 1.3 (a
``DataTree``), both by ``tests/data/make_arviz_fixtures.py``, which also wrote the χ it
estimated from each file to ``arviz{0,1}_expected.json``. Whichever interpreter runs the
suite loads both into its own container and must get those numbers again. They are
deterministic functions of the stored draws (no resampling), so the tolerance is
floating-point rounding across NumPy/SciPy builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from arviz_reference import ARVIZ_MAJOR, az  # noqa: E402

from bayes_susc import load, save  # noqa: E402
from bayes_susc.estimation.response_matrix import build_response_matrix  # noqa: E402
from bayes_susc.estimation.susceptibility import estimate  # noqa: E402
from bayes_susc.report import plots  # noqa: E402
from bayes_susc.storage.draws import get_group, group_names  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
GENERATIONS = (0, 1)
RTOL = 1e-9


def _expected(gen: int) -> dict:
    return json.loads((DATA / f"arviz{gen}_expected.json").read_text())


@pytest.mark.parametrize("gen", GENERATIONS)
def test_fixture_was_made_under_its_generation(gen):
    expected = _expected(gen)
    assert expected["made_with"]["arviz"].split(".")[0] == str(gen)
    assert expected["container"] == ("InferenceData" if gen == 0 else "DataTree")
    # The run records the versions that sampled it: the same ArviZ.
    attrs = get_group(load(DATA / f"arviz{gen}_run.nc"), "posterior").attrs
    versions = json.loads(attrs["bayes_susc_config"])["versions"]
    assert versions["arviz"] == expected["made_with"]["arviz"]


@pytest.mark.parametrize("gen", GENERATIONS)
def test_fixture_loads_estimates_and_saves_under_this_generation(gen, tmp_path):
    expected = _expected(gen)
    data = load(DATA / f"arviz{gen}_run.nc")
    # The installed generation's own container, whichever generation wrote the file.
    assert isinstance(data, az.InferenceData if ARVIZ_MAJOR < 1 else xr.DataTree)
    assert group_names(data) == ["posterior", "sample_stats", "constant_data"]
    post = get_group(data, "posterior")
    assert post["probe_loss"].shape == (2, 40, 6) and post["phi"].dtype == np.float64
    est = estimate(data)
    assert [str(t) for t in est["token"].values] == expected["token"]
    for name, values in expected["estimate"].items():
        want = np.array([np.nan if v is None else v for v in values], dtype=float)
        np.testing.assert_allclose(est[name].values, want, rtol=RTOL, err_msg=name)
    # The numbers are estimates, not NaN == NaN: finite, some χ away from zero.
    assert np.isfinite(est["chi"]).all() and (np.abs(est["chi"]) > 2 * est["se"]).any()
    # Saved again under this generation, it reads back identical.
    again = save(data, tmp_path / "again.nc")
    back = load(again)
    for g in group_names(data):
        xr.testing.assert_identical(get_group(back, g), get_group(data, g))


def test_both_generations_in_one_response_matrix_and_report(tmp_path):
    runs = {f"arviz{gen}": load(DATA / f"arviz{gen}_run.nc") for gen in GENERATIONS}
    matrix = build_response_matrix(runs)
    assert list(matrix["component"].values) == ["arviz0", "arviz1"]
    for gen in GENERATIONS:
        chi = matrix["chi"].sel(component=f"arviz{gen}").values
        np.testing.assert_allclose(chi, _expected(gen)["estimate"]["chi"], rtol=RTOL)
    assert set(np.unique(matrix["status"].values)) <= {
        "ok",
        "ess",
        "rhat",
        "ci_contains_zero",
        "not_significant_bh",
    }
    figures = {
        "heatmap.png": plots.heatmap(matrix),
        "trace0.png": plots.trace(runs["arviz0"]),
        "trace1.png": plots.trace(runs["arviz1"]),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 1000, name

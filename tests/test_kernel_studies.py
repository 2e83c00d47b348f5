"""The kernel studies (diagnostics/kernels_exact.py, kernels_nuts.py, efficiency.py) in
quick mode: they run, write their outputs, and their numbers are finite and plausible."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # diagnostics/ is not installed
from diagnostics import efficiency, kernels_exact, kernels_nuts  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _files(out: Path, names: tuple[str, ...]) -> dict:
    for name in names:
        assert (out / name).stat().st_size > 0, name
    assert "Verdict" in (out / "report.md").read_text()
    return json.loads((out / "results.json").read_text())


def test_quick_kernels_exact_study(tmp_path):
    kernels_exact.main(["--out", str(tmp_path), "--quick", "--seed", "1"])
    res = _files(tmp_path, ("report.md", "results.json", "bias_vs_step.png"))
    assert {"config", "sweep", "grid", "slopes", "runtime_s"} <= set(res)
    for r in res["sweep"] + res["grid"]:
        assert r["diverged_chains"] == 0, r
        for e in (r["vs_posterior"], r["vs_own_law"]):
            for v in e.values():
                assert math.isfinite(v) and v >= 0
    # MALA samples Σ itself: its covariance error is within Monte Carlo error (the quick
    # run's floor is ≈ 0.04–0.08). A kernel whose noise or drift is off by 10–20% (SGLD at
    # h = 2 already is, 0.155) fails the z bound.
    for r in [r for r in res["sweep"] + res["grid"] if r["kernel"] == "mala"]:
        e = r["vs_posterior"]
        assert e["cov_err"] < 0.15 and e["cov_maxz"] < 5.0, r
        assert 0.5 < r["acceptance"] < 1.0
    # SGLD at the largest step: its own law explains the draws; Σ does not.
    top = max((r for r in res["sweep"] if r["kernel"] == "sgld"), key=lambda r: r["h"])
    assert top["vs_own_law"]["cov_err"] < top["vs_posterior"]["cov_err"]
    assert top["vs_own_law"]["cov_maxz"] < 5.0 < top["vs_posterior"]["cov_maxz"]
    assert top["vs_own_law"]["chi_err"] < top["vs_posterior"]["chi_err"]
    # The closed forms' bias is first order in ε·λmax for SGLD.
    assert 0.8 < res["slopes"]["sgld"] < 1.3


def test_quick_kernels_nuts_study(tmp_path):
    kernels_nuts.main(["--out", str(tmp_path), "--quick", "--seed", "0"])
    res = _files(tmp_path, ("report.md", "results.json", "scatter.png"))
    assert {"config", "target", "nuts", "kernels", "runtimes_s"} <= set(res)
    assert res["config"]["num_probe"] == 20
    # The likelihood, not the prior, sets the top of the Hessian.
    assert res["target"]["lambda_max"] > 10 * res["config"]["gamma"]
    assert all(math.isfinite(c) for c in res["nuts"]["chi"])
    for k, r in res["kernels"].items():
        assert 0.0 <= r["frac_within"] <= 1.0, k
        assert -1.0 <= r["corr"] <= 1.0, k
        assert r["diverged_chains"] == 0, k
    # MALA is exact: at quick length most probes agree with NUTS within intervals.
    assert res["kernels"]["mala"]["frac_within"] >= 0.7


def test_quick_efficiency_study(tmp_path):
    efficiency.main(["--out", str(tmp_path), "--quick", "--seed", "0"])
    res = _files(tmp_path, ("report.md", "results.json", "efficiency.png"))
    assert {"config", "linear_gaussian", "mlp", "runtime_s"} <= set(res)
    assert "nuts" in res["mlp"]
    for target in ("linear_gaussian", "mlp"):
        for k, r in res[target].items():
            assert r["gradient_evaluations"] > 0, k
            assert 0 < r["median_ess_bulk"] < 10 * r["gradient_evaluations"], k
            assert math.isfinite(r["ess_per_second"]) and r["ess_per_second"] > 0, k
    # NUTS makes several gradient evaluations per draw.
    nuts = res["mlp"]["nuts"]
    cfg = res["config"]["nuts"]
    assert nuts["gradient_evaluations"] > 2 * cfg["num_draws"] * cfg["num_chains"]

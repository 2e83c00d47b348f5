"""The coverage study (diagnostics/coverage.py): its quick mode runs and writes its outputs,
and the default interval method keeps a coverage near nominal on a replication set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bayes_susc.estimation.susceptibility import estimate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # diagnostics/ is not installed
from diagnostics import coverage  # noqa: E402


def test_quick_coverage_study_writes_report(tmp_path):
    coverage.main(["--out", str(tmp_path), "--quick", "--seed", "3"])
    for name in ("report.md", "results.json", "coverage_vs_ess.png", "zscores.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "overall", "settings", "torch_sampler", "runtimes_s"} <= set(res)
    assert res["config"]["default_method"] == "ess_t"
    for method, block in res["overall"].items():
        assert set(block["by_ess"]) == set(coverage.BIN_LABELS), method
        for rate in (block["all"], block["ess_ge_100"], *block["by_ess"].values()):
            if rate["n"]:
                assert 0.0 <= rate["coverage"] <= 1.0
                assert rate["wilson_low"] <= rate["coverage"] <= rate["wilson_high"]
    for rate in res["torch_sampler"]["methods"].values():
        assert 0.0 <= rate["coverage"] <= 1.0
    assert "Verdict" in (tmp_path / "report.md").read_text()


def test_default_interval_coverage_is_near_nominal():
    """60 replications × 8 entries of 4 × 200 draws (median ESS ≈ 200).

    The full study measures ≈ 0.93 for the default here, with a cluster-robust SE of
    ≈ 0.014 at 60 replications (entries of one replication share φ, so their misses
    cluster). 0.85 sits > 5 such SEs below: it fails for intervals that ignore
    autocorrelation (iid bootstrap ≈ 0.6) or that use normal quantiles on this
    heavy-tailed product series with percentile bootstrap SEs (≈ 0.84–0.86 here), and
    passes at any seed for the calibrated default.
    """
    pr = coverage.make_problem(1)
    rng = np.random.default_rng(12)
    phi, delta, truth = coverage.simulate(pr, 1e-3, 60, 200, 1, rng)
    hits = []
    for r in range(60):
        ds = estimate({"phi": phi[r], "delta_loss": delta[r]})
        hits.append((ds["ci_low"].values <= truth) & (truth <= ds["ci_high"].values))
    rate = float(np.mean(hits))
    assert rate >= 0.85, rate

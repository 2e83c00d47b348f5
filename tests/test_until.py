"""Sampling to a convergence target (issue 19, deliverable 1): ``sample_until`` extends a
run in rounds, equal bit for bit to one run of the total length, and stops for the
documented reason; bad settings fail before any draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from bayes_susc import get_group, sample
from bayes_susc.checks.ground_truth import LinearGaussianProblem, torch_local_posterior
from bayes_susc.checks.until import (
    Target,
    TargetReport,
    diagnose_entries,
    draws_needed,
    sample_until,
)
from bayes_susc.estimation import convergence, response_matrix
from bayes_susc.estimation.susceptibility import product_series
from bayes_susc.sampling import driver
from bayes_susc.sampling.driver import SAMPLER_STATE_GROUP
from bayes_susc.storage.draws import group_names

SETTINGS = dict(num_chains=4, seed=3, step_size=1e-3, progress=False)


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(1)  # bit-for-bit equality needs one thread count throughout
    post, eval_data, probe_data = torch_local_posterior(
        LinearGaussianProblem.make(p=6, free=[0, 2, 5], n_eval=100, n_probe=8, seed=1)
    )
    return post, {"eval_data": eval_data, "probe_data": probe_data}


def _until(problem, target: Target, num_draws: int = 50, **kw):
    post, data = problem
    opts = dict(SETTINGS, **data)
    opts.update(kw)
    return sample_until(post, "sgld", target=target, num_draws=num_draws, **opts)


def _arrays(run) -> dict[str, np.ndarray]:
    post = get_group(run, "posterior")
    return {k: post[k].values for k in ("phi", "probe_loss", "eval_loss")}


def test_defaults_follow_the_response_matrix():
    t = Target()
    assert t.max_rhat == response_matrix.DEFAULT_MAX_RHAT
    assert t.min_ess == response_matrix.DEFAULT_MIN_ESS
    assert t.min_draws == response_matrix.DEFAULT_MIN_DRAWS
    assert (t.fraction, t.round_draws, t.max_draws, t.time_budget) == (0.95, 100, 2000, None)


def test_impossible_target_stops_at_max_draws_equal_to_one_run(problem):
    # (c) R-hat never gets this close to 1: three rounds (50, 100, 150), then the cap.
    target = Target(max_rhat=1.0000001, min_ess=1, min_draws=0, round_draws=50, max_draws=170)
    run, report = _until(problem, target)
    assert isinstance(report, TargetReport)
    assert not report.reached
    assert "max_draws" in report.reason
    assert report.draws_per_chain == 150
    assert [r["draws_per_chain"] for r in report.rounds] == [50, 100, 150]
    assert SAMPLER_STATE_GROUP in group_names(run)  # still extendable
    assert report.estimated_draws_per_chain is not None
    assert report.estimated_draws_per_chain >= 150
    assert len(report.summary().splitlines()) == len(report.rounds) + 1

    # (a) the stopped run equals one uninterrupted run of 50 + (3 − 1)·50 draws.
    post, data = problem
    want = sample(post, "sgld", num_draws=150, **dict(SETTINGS, **data))
    got, ref = _arrays(run), _arrays(want)
    for name in ref:
        assert np.array_equal(got[name], ref[name]), name


def test_easy_target_is_reached_and_fraction_recomputes(problem):
    # (b) the reported fraction is recomputed here from the returned draws.
    target = Target(fraction=0.5, min_ess=50, min_draws=200, round_draws=100, max_draws=1000)
    run, report = _until(problem, target, num_draws=200)
    assert report.reached
    assert report.reason == "target reached"
    assert report.estimated_draws_per_chain is None

    post = get_group(run, "posterior")
    phi = post["phi"].values
    delta = post["probe_loss"].values - post["eval_loss"].values[..., None]
    series = product_series(phi, delta)
    rhat = convergence.rhat(series)
    ess = np.minimum(convergence.ess_bulk(series), convergence.ess_tail(series))
    passing = (rhat <= target.max_rhat) & (ess >= target.min_ess) & (phi.size >= 200)
    last = report.rounds[-1]
    assert last["fraction_passing"] == passing.mean()
    assert last["fraction_passing"] >= 0.5
    assert last["draws_per_chain"] == report.draws_per_chain == phi.shape[1]
    assert last["median_rhat"] == np.median(rhat)
    assert last["median_ess"] == np.median(ess)


def test_tiny_time_budget_stops_after_the_first_round(problem, capsys):
    # (d) progress prints one line per round.
    target = Target(max_rhat=1.0000001, round_draws=10, max_draws=500, time_budget=1e-9)
    run, report = _until(problem, target, num_draws=20, progress=True)
    assert not report.reached
    assert "budget" in report.reason
    assert len(report.rounds) == 1
    assert get_group(run, "posterior").sizes["draw"] == 20
    out = capsys.readouterr().out
    assert "20 draws/chain" in out and "converged" in out


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"fraction": 0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"round_draws": 0}, "round_draws"),
        ({"time_budget": -1.0}, "time_budget"),
        ({"max_rhat": 0.9}, "max_rhat"),
        ({"min_ess": 0}, "min_ess"),
        ({"min_draws": 2.5}, "min_draws"),
    ],
)
def test_bad_target_fields_raise_naming_them(kw, field):
    with pytest.raises(ValueError, match=field):
        Target(**kw)


def test_bad_settings_raise_before_any_draw(problem, monkeypatch):
    # (e) sample is never reached: validation comes first.
    def forbidden(*args, **kwargs):
        raise AssertionError("sample was called")

    monkeypatch.setattr(driver, "sample", forbidden)
    with pytest.raises(ValueError, match="max_draws"):
        _until(problem, Target(max_draws=40), num_draws=50)
    with pytest.raises(ValueError, match="fraction"):
        _until(problem, Target(fraction=0))
    with pytest.raises(ValueError, match="num_draws"):
        _until(problem, Target(), num_draws=0)
    with pytest.raises(ValueError, match="step_size"):
        _until(problem, Target(), step_size=-1.0)
    with pytest.raises(TypeError, match="target"):
        _until(problem, {"fraction": 0.5})


def test_diverged_chains_are_left_out_of_the_diagnosis(problem):
    post, data = problem
    run = sample(post, "sgld", num_draws=60, **dict(SETTINGS, **data))
    ds = get_group(run, "posterior").copy(deep=True)
    ds["phi"][0, 5] = np.nan  # chain 0 diverged
    target = Target(min_ess=10, min_draws=180)
    diag = diagnose_entries(xr.DataTree.from_dict({"posterior": ds}), target)
    assert diag["pooled_draws"] == 3 * 60
    phi = ds["phi"].values[1:]
    delta = ds["probe_loss"].values[1:] - ds["eval_loss"].values[1:, :, None]
    series = product_series(phi, delta)
    np.testing.assert_array_equal(diag["rhat"], convergence.rhat(series))
    ess = np.minimum(convergence.ess_bulk(series), convergence.ess_tail(series))
    np.testing.assert_array_equal(diag["ess"], ess)
    # Judged in probe chunks of 3 (the series of one chunk at a time): the same numbers.
    chunked = diagnose_entries(xr.DataTree.from_dict({"posterior": ds}), target, probe_chunk=3)
    for key in ("rhat", "ess", "passing"):
        np.testing.assert_array_equal(chunked[key], diag[key])
    with pytest.raises(ValueError, match="probe_chunk"):
        diagnose_entries(xr.DataTree.from_dict({"posterior": ds}), target, probe_chunk=0)

    ds["phi"][:] = np.nan  # every chain diverged: nothing passes, medians are NaN
    diag = diagnose_entries(xr.DataTree.from_dict({"posterior": ds}), target)
    assert diag["pooled_draws"] == 0 and diag["fraction_passing"] == 0.0
    assert np.isnan(diag["median_rhat"]) and np.isnan(diag["median_ess"])


def test_draws_needed_scales_ess_and_rhat_exactly():
    """ESS ∝ draws and R-hat − 1 ∝ 1/draws, at the target's quantiles of the entries."""
    ess = np.linspace(10.0, 110.0, 101)  # the 0.1 quantile is 20
    rhat = 1.0 + np.linspace(0.0, 0.1, 101)  # the 0.9 quantile is 1.09
    diagnosis = {"ess": ess, "rhat": rhat, "pooled_draws": 400}  # 4 chains x 100
    by_ess = Target(min_ess=100, max_rhat=2.0, min_draws=0, fraction=0.9)
    assert draws_needed(diagnosis, 100, by_ess) == 500  # 100 * 100 / 20
    by_rhat = Target(min_ess=1, max_rhat=1.01, min_draws=0, fraction=0.9)
    assert draws_needed(diagnosis, 100, by_rhat) == 900  # 100 * 0.09 / 0.01
    by_pool = Target(min_ess=1, max_rhat=2.0, min_draws=2000, fraction=0.9)
    assert draws_needed(diagnosis, 100, by_pool) == 500  # 2000 pooled over 4 chains
    nan = {"ess": np.full(3, np.nan), "rhat": np.full(3, np.nan), "pooled_draws": 0}
    assert draws_needed(nan, 100, by_ess) is None

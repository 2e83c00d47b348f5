"""Trace health checks (bayes_susc.checks.health): a healthy run passes every check, and each
planted failure is flagged by the check meant for it, with the action it suggests.

Targets: the linear–Gaussian model of DESIGN.md §5 (exact Gaussian posterior, full batch)
for real runs; hand-built InferenceData where a failure is easier to plant exactly.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import xarray as xr

import bayes_susc
from bayes_susc import DivergenceWarning
from bayes_susc.checks.ground_truth import LinearGaussianProblem, torch_local_posterior
from bayes_susc.checks.health import (
    MIN_ESS,
    TARGET_ESS,
    HealthReport,
    HealthThresholds,
    MalaCheck,
    check_health,
    check_mala_acceptance,
    check_run_health,
    mala_acceptance,
)
from bayes_susc.storage.draws import make_inference_data
from bayes_susc.target.posterior import LocalPosterior


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.array(a), dtype=torch.float64)


def _loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    X, y = batch
    return 0.5 * (y - m(X).squeeze(-1)) ** 2


def _posterior(problem: LinearGaussianProblem) -> LocalPosterior:
    return torch_local_posterior(problem)[0]


def _sample(problem: LinearGaussianProblem, posterior: LocalPosterior, kernel="sgld", **kw):
    X_e = problem.X_train if problem.X_eval is None else problem.X_eval
    y_e = problem.y_train if problem.y_eval is None else problem.y_eval
    return bayes_susc.sample(
        posterior,
        kernel,
        eval_data=(_t(X_e), _t(y_e)),
        probe_data=(_t(problem.X_probe), _t(problem.y_probe)),
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def small():
    """3 free coordinates of 4, nβ = γ = 100: λ(K) ≈ 124–270."""
    problem = LinearGaussianProblem.make(
        n=200, p=4, n_eval=50, n_probe=4, free=[0, 1, 2], nbeta=100.0, gamma=100.0, seed=0
    )
    return problem, _posterior(problem), float(np.linalg.eigvalsh(problem.K)[-1])


@pytest.fixture(scope="module")
def healthy(small):
    """Full-batch SGLD at ε·λmax = 1 with burn-in and thinning: a healthy run."""
    problem, posterior, lam_max = small
    return _sample(
        problem, posterior, step_size=1.0 / lam_max,
        num_chains=4, num_draws=400, num_burnin=200, steps_per_draw=5, seed=1,
    )  # fmt: skip


def _assert_actions(report: HealthReport) -> None:
    """Every printed line ends with the verdict's action (STYLE.md, Stan section)."""
    lines = report.summary().splitlines()[1:]
    assert len(lines) == len(report.verdicts)
    for line, verdict in zip(lines, report.verdicts):
        assert verdict.action and line.endswith("→ " + verdict.action), line
    json.dumps(report.to_dict(), allow_nan=False)


# ---------------------------------------------------------------- hand-built runs
def _ar1(rng: np.random.Generator, chains: int, draws: int, rho: float = 0.5) -> np.ndarray:
    e = rng.standard_normal((chains, draws + 100))
    x = np.zeros_like(e)
    for t in range(1, e.shape[1]):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    return x[:, 100:]


def _idata(
    eval_loss: np.ndarray,
    *,
    loss: np.ndarray | None = None,
    distance: np.ndarray | None = None,
    diverged: np.ndarray | None = None,
    anchor: float = 0.0,
    config: dict | None = None,
):
    """A sampling result built by hand, with the layout ``bayes_susc.sample`` writes."""
    chains, draws = eval_loss.shape
    cd = ("chain", "draw")
    coords = {"chain": np.arange(chains), "draw": np.arange(draws)}
    loss = eval_loss if loss is None else loss
    distance = np.abs(eval_loss) if distance is None else distance
    diverged = np.zeros((chains, draws), bool) if diverged is None else diverged
    attrs = {"component": "hand", "kernel": "sgld"}
    if config is not None:
        attrs["bayes_susc_config"] = json.dumps(config)
    post = xr.Dataset(
        {"phi": (cd, eval_loss - anchor), "eval_loss": (cd, eval_loss)}, coords=coords, attrs=attrs
    )
    stats = xr.Dataset(
        {
            "loss": (cd, loss),
            "potential": (cd, 30 * loss),
            "grad_norm": (cd, np.ones_like(loss)),
            "distance": (cd, distance),
            "diverged": (cd, diverged),
        },
        coords=coords,
        attrs=attrs,
    )
    const = xr.Dataset({"eval_loss_anchor": ((), anchor)})
    return make_inference_data({"posterior": post, "sample_stats": stats, "constant_data": const})


def _stationary(seed: int = 0, chains: int = 4, draws: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 1.0 + 0.01 * _ar1(rng, chains, draws)


# ------------------------------------------------------------------------- tests
def test_healthy_run_passes_every_check(small, healthy):
    problem, posterior, _ = small
    report = check_health(healthy, posterior=posterior)
    assert report.ok and report.status == "ok", report.summary()
    names = [v.name for v in report.verdicts]
    assert names == [
        "divergences", "stuck", "loss_trend", "loss_anchor", "spikes", "rhat",
        "autocorrelation", "distance", "mala_acceptance",
    ]  # fmt: skip
    assert all(v.status == "ok" for v in report.verdicts), report.summary()
    accept = report["mala_acceptance"]
    assert 0.5 <= accept.value <= 0.99
    # The loss rose above L(w*) (expected ½tr(H_E Σ) > 0) and τ is reported in steps.
    assert report["loss_anchor"].value > 0
    auto = report["autocorrelation"].details
    assert auto["tau_steps"] == pytest.approx(5 * auto["tau_draws"])
    assert report.info["steps_per_draw"] == 5 and report.info["chains"] == 4
    _assert_actions(report)


def test_too_large_step_diverges_and_fails(small):
    """ε·λmax = 10 > 4: SGLD is unstable, every chain overflows; the divergence check
    fails with "lower step_size", and so does the MALA acceptance of that move."""
    problem, posterior, lam_max = small
    eps = 10.0 / lam_max
    with pytest.warns(DivergenceWarning):
        data = _sample(problem, posterior, step_size=eps, num_chains=4, num_draws=100,
                       steps_per_draw=5, seed=2)  # fmt: skip
    report = check_health(data, posterior=posterior, mala=MalaCheck(moves=20))
    assert not report.ok
    div = report["divergences"]
    assert div.status == "fail" and div.value == 1.0
    assert "lower step_size" in div.action
    assert report["mala_acceptance"].status == "fail"
    assert report["mala_acceptance"].value < 0.5
    assert "lower step_size" in report["mala_acceptance"].action
    _assert_actions(report)


def test_acceptance_falls_below_the_range_as_the_step_grows(small):
    """Healthy at ε·λmax = 1; above the range for a tiny step; below it past stability."""
    _, posterior, lam_max = small
    ok = check_mala_acceptance(posterior, 1.0 / lam_max, num_moves=50)
    assert ok.status == "ok" and 0.5 <= ok.value <= 0.99
    tiny = check_mala_acceptance(posterior, 0.01 / lam_max, num_moves=50)
    assert tiny.status == "warn" and tiny.value > 0.99 and "raised" in tiny.action
    big = check_mala_acceptance(posterior, 4.5 / lam_max, num_moves=50)
    assert big.status == "fail" and big.value < 0.5
    assert big.action == "step too large for this curvature: lower step_size"


def test_mala_acceptance_from_given_positions(small):
    _, posterior, lam_max = small
    start = posterior.anchor_vector.repeat(3, 1) + 0.05
    probs = mala_acceptance(posterior, 1.0 / lam_max, positions=start, num_moves=7, seed=3)
    assert probs.shape == (3, 7)
    assert np.all((probs >= 0) & (probs <= 1))
    again = mala_acceptance(posterior, 1.0 / lam_max, positions=start, num_moves=7, seed=3)
    np.testing.assert_array_equal(probs, again)
    with pytest.raises(ValueError, match=r"positions must have shape \(chains, 3\)"):
        mala_acceptance(posterior, 1e-3, positions=torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="step_size must be > 0"):
        mala_acceptance(posterior, -1.0)


def test_loss_still_rising_is_flagged():
    """No burn-in and a step 4× too small for the run's length (ε·median λ(K)·steps =
    0.25, γ ≈ 0): 200 directions are still filling their posterior variance, so the
    loss keeps climbing and ‖v − v*‖ keeps growing through the kept draws. Measured
    z of the loss trend over seeds 1–6: 6.2–8.1 (threshold 3)."""
    problem = LinearGaussianProblem.make(
        n=1000, p=200, n_eval=None, n_probe=4, nbeta=100.0, gamma=0.01, seed=0
    )
    posterior = _posterior(problem)
    eps = 0.25 / (float(np.median(np.linalg.eigvalsh(problem.K))) * 400)
    data = _sample(problem, posterior, step_size=eps, num_chains=8, num_draws=400, seed=1)
    report = check_health(data)
    trend = report["loss_trend"]
    assert trend.status in ("warn", "fail") and trend.value > 3, report.summary()
    assert trend.action == "loss still rising: raise γ or lower nβ, or burn in longer"
    assert report["distance"].status in ("warn", "fail")
    assert "raise γ" in report["distance"].action
    assert report["rhat"].status == "fail"  # split R-hat sees the drift too
    _assert_actions(report)


def test_chains_stuck_at_different_levels_fail_rhat():
    rng = np.random.default_rng(4)
    levels = np.array([1.0, 1.02, 1.04, 1.06])[:, None]
    x = levels + 0.01 * _ar1(rng, 4, 400)
    report = check_health(_idata(x, anchor=0.9))
    rhat = report["rhat"]
    assert rhat.status == "fail" and rhat.value > 1.1
    assert rhat.action == "chains disagree: run longer or raise γ"
    # Each chain is stationary on its own: the trend check stays quiet.
    assert report["loss_trend"].status == "ok"
    _assert_actions(report)


def test_stationary_hand_built_run_is_ok():
    config = {"steps_per_draw": 3, "dim": 10, "gamma": 100.0, "kernel_hyperparameters": {}}
    x = _stationary()
    report = check_health(_idata(x, anchor=0.9, distance=0.2 + 0.01 * x, config=config))
    assert report.ok and report.status == "ok", report.summary()
    assert report["autocorrelation"].details["steps_per_draw"] == 3
    assert report["distance"].details["scale"] == pytest.approx(np.sqrt(10 / 100.0))


def test_spikes_and_nonfinite_values():
    x = _stationary(seed=5)
    spiky = x.copy()
    spiky[2, 250] += 1.0  # ~100 robust SD of the increments
    report = check_health(_idata(spiky, anchor=0.9))
    spikes = report["spikes"]
    assert spikes.status == "warn" and spikes.value > 20
    assert spikes.action == "spikes: lower step_size"
    assert spikes.details["per_variable"]["eval_loss"]["num_spikes"] == 2  # up, then down

    broken = x.copy()
    broken[1, 100] = np.nan  # not flagged as diverged by the driver
    report = check_health(_idata(broken, loss=x, anchor=0.9))
    assert report["spikes"].status == "fail" and "lower step_size" in report["spikes"].action
    assert not report.ok


def test_diverged_chain_is_excluded_from_the_other_checks():
    x = _stationary(seed=6)
    diverged = np.zeros(x.shape, bool)
    diverged[3, 300:] = True
    x[3, 300:] = np.nan
    report = check_health(_idata(x, anchor=0.9, diverged=diverged))
    assert report["divergences"].status == "fail" and report["divergences"].value == 0.25
    assert report["divergences"].details["diverged_chains"] == [3]
    for name in ("loss_trend", "rhat", "spikes"):
        assert report[name].status == "ok", report.summary()


def test_loss_below_anchor_warns():
    x = _stationary(seed=7)
    report = check_health(_idata(x, anchor=1.1))
    below = report["loss_anchor"]
    assert below.status == "warn" and below.value < 0
    assert "w* is not a local minimum" in below.action
    assert report.ok  # a warning, not a failure


def test_loss_far_above_anchor_fails_beyond_the_local_posterior_bound():
    """d/(2nβ) bounds the mean excess loss of a local posterior near a minimum; a rise
    of more than 3 times that (and 3 SE) fails, a rise within it passes."""
    config = {"dim": 24, "nbeta": 30.0}  # d/(2nβ) = 0.4 nats
    x = _stationary(seed=11)  # mean 1.0, SE about 0.001
    far = check_health(_idata(x, anchor=1.0 - 1.3, config=config))["loss_anchor"]
    assert far.status == "fail" and far.value == pytest.approx(1.3, abs=0.01)
    assert far.details["quadratic_bound"] == pytest.approx(0.4)
    assert "lower step_size" in far.action
    near = check_health(_idata(x, anchor=1.0 - 1.1, config=config))["loss_anchor"]
    assert near.status == "ok"  # 1.1 nats < 3 x 0.4
    loose = HealthThresholds(anchor_rise_factor=4.0)
    assert (
        check_health(_idata(x, anchor=-0.3, config=config), thresholds=loose)["loss_anchor"].status
        == "ok"
    )  # 1.3 < 4 x 0.4


def test_distance_far_beyond_the_localization_scale():
    config = {"dim": 10, "gamma": 1000.0}  # sqrt(dim/γ) = 0.1
    x = _stationary(seed=8)
    report = check_health(_idata(x, anchor=0.9, distance=2.0 + 0.01 * x, config=config))
    dist = report["distance"]
    assert dist.status == "fail" and dist.value == pytest.approx(20, rel=0.01)
    assert "raise γ" in dist.action


def test_short_run_autocorrelation_recommends_more_draws():
    rng = np.random.default_rng(9)
    x = 1.0 + 0.01 * _ar1(rng, 4, 200, rho=0.95)  # τ ≈ 39 draws: ESS ≈ 20
    report = check_health(_idata(x, anchor=0.9, config={"steps_per_draw": 2}))
    auto = report["autocorrelation"]
    assert auto.status == "fail" and auto.value < 100
    d = auto.details
    assert d["recommended_steps_per_draw"] == int(np.ceil(d["tau_steps"]))
    assert d["draws_per_chain_for_target_ess"] == int(np.ceil(400 * d["tau_draws"] / 4))
    assert f"run >= {d['draws_per_chain_for_target_ess']} draws per chain" in auto.action


def test_mala_run_uses_its_recorded_acceptance(small):
    problem, posterior, lam_max = small
    data = _sample(problem, posterior, "mala", step_size=1.0 / lam_max, num_chains=2,
                   num_draws=40, seed=3)  # fmt: skip
    verdict = check_health(data)["mala_acceptance"]
    assert verdict.details["source"] == "recorded by the MALA run"
    recorded = float(data.sample_stats["acceptance_rate"].mean())
    assert verdict.value == pytest.approx(recorded)


def test_run_health_table(small, healthy):
    _, posterior, _ = small
    rng = np.random.default_rng(10)
    stuck = _idata(np.array([1.0, 1.05, 1.1, 1.15])[:, None] + 0.01 * _ar1(rng, 4, 400))
    run = check_run_health({"good": healthy, "stuck": stuck}, posteriors={"good": posterior})
    assert not run.ok and run.status == "fail"
    assert run.statuses() == {"good": "ok", "stuck": "fail"}
    table = run.table()
    assert list(table.index) == ["good", "stuck"]
    assert table.loc["stuck", "rhat"] == "fail" and table.loc["good", "mala_acceptance"] == "ok"
    assert table.loc["stuck", "action"] == "chains disagree: run longer or raise γ"
    text = run.summary()
    assert "component 'good'" in text and "component 'stuck'" in text
    assert run["stuck"].component == "stuck"
    json.dumps(run.to_dict(), allow_nan=False)


def test_bad_arguments(healthy):
    with pytest.raises(TypeError, match="thresholds must be a HealthThresholds"):
        check_health(healthy, thresholds={"min_ess": 50})
    with pytest.raises(TypeError, match="mala must be a MalaCheck"):
        check_health(healthy, mala={"moves": 20})
    with pytest.raises(TypeError, match="posterior must be a LocalPosterior"):
        check_health(healthy, posterior="nope")
    with pytest.raises(ValueError, match="non-empty mapping"):
        check_run_health({})
    with pytest.raises(ValueError, match="not in runs"):
        check_run_health({"a": healthy}, posteriors={"b": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_health(healthy)  # no posterior: no acceptance check, and no warning


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rhat_warn": 1.2, "rhat_fail": 1.1}, ValueError, "rhat_warn must be <= rhat_fail"),
        ({"trend_z": 6.0}, ValueError, "trend_z must be <= trend_z_fail, got 6.0 > 5.0"),
        ({"min_ess": 500.0}, ValueError, "min_ess must be <= target_ess"),
        ({"distance_factor_fail": 2.0}, ValueError, "distance_factor must be <= distance_"),
        ({"spike_z": 0}, ValueError, "spike_z must be > 0"),
        ({"anchor_z": -1.0}, ValueError, "anchor_z must be > 0"),
        ({"target_ess": float("inf")}, ValueError, "target_ess must be finite"),
        ({"min_ess": "50"}, TypeError, "min_ess must be a real number"),
        ({"acceptance_range": (0.9, 0.5)}, ValueError, "acceptance_range must satisfy"),
        ({"acceptance_range": (0.5, 1.5)}, ValueError, "acceptance_range must satisfy"),
        ({"acceptance_range": (0.5,)}, ValueError, "acceptance_range must be two numbers"),
        ({"spike_vars": ["loss", 3]}, TypeError, "spike_vars must be a sequence of variable"),
    ],
)
def test_thresholds_are_validated_when_made(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HealthThresholds(**kwargs)


def test_thresholds_defaults_and_normal_form():
    t = HealthThresholds()
    assert (t.min_ess, t.target_ess) == (MIN_ESS, TARGET_ESS)
    assert t.spike_vars == ("eval_loss", "loss") and t.acceptance_range == (0.5, 0.99)
    # Numbers become floats, one name a 1-tuple, a list a tuple: equal settings compare
    # equal and hash alike, and a frozen object cannot be changed behind a report's back.
    u = HealthThresholds(min_ess=50, spike_vars="eval_loss", acceptance_range=[0.4, 1])
    same = HealthThresholds(min_ess=50.0, spike_vars=("eval_loss",), acceptance_range=(0.4, 1.0))
    assert u == same and hash(u) == hash(same) and isinstance(u.min_ess, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.min_ess = 10.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"step_size": 0.0}, ValueError, "step_size must be > 0"),
        ({"batch": "second"}, ValueError, "batch must be 'first' or 'full'"),
        ({"moves": 0}, ValueError, "moves must be >= 1"),
        ({"moves": 2.5}, TypeError, "moves must be an int"),
        ({"chains": 0}, ValueError, "chains must be >= 1"),
    ],
)
def test_mala_check_is_validated_when_made(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MalaCheck(**kwargs)


def test_thresholds_decide_the_verdicts():
    """The same run judged with other thresholds: a failing ESS becomes a warning, a
    warning spike becomes ok, and check_run_health applies them to every component."""
    rng = np.random.default_rng(9)
    x = 1.0 + 0.01 * _ar1(rng, 4, 200, rho=0.95)  # ESS ≈ 20
    data = _idata(x, anchor=0.9)
    assert check_health(data)["autocorrelation"].status == "fail"
    lenient = HealthThresholds(min_ess=10.0)
    auto = check_health(data, thresholds=lenient)["autocorrelation"]
    assert auto.status == "warn" and auto.details["min_ess"] == 10.0
    run = check_run_health({"a": data, "b": data}, thresholds=lenient)
    assert run.statuses() == {"a": "warn", "b": "warn"}

    spiky = _stationary(seed=5)
    spiky[2, 250] += 1.0
    assert check_health(_idata(spiky, anchor=0.9))["spikes"].status == "warn"
    report = check_health(_idata(spiky, anchor=0.9), thresholds=HealthThresholds(spike_z=1e6))
    assert report["spikes"].status == "ok"
    # Screening only a variable that holds no spike.
    only_loss = HealthThresholds(spike_vars="loss")
    report = check_health(_idata(spiky, loss=_stationary(seed=5), anchor=0.9), thresholds=only_loss)
    assert report["spikes"].status == "ok"
    assert set(report["spikes"].details["per_variable"]) == {"loss"}


def test_mala_check_settings_reach_the_acceptance_run(small, healthy):
    _, posterior, lam_max = small
    verdict = check_health(
        healthy, posterior=posterior, mala=MalaCheck(moves=7, chains=2, batch="full"), seed=3
    )["mala_acceptance"]
    assert verdict.details["num_moves"] == 7 and len(verdict.details["per_chain"]) == 2
    direct = check_mala_acceptance(
        posterior, verdict.details["step_size"], batch=None, num_chains=2, num_moves=7, seed=3
    )
    assert verdict.value == direct.value
    # An explicit ε is scored in place of the run's own.
    other = check_health(
        healthy, posterior=posterior, mala=MalaCheck(step_size=0.5 / lam_max, moves=7)
    )["mala_acceptance"]
    assert other.details["step_size"] == pytest.approx(0.5 / lam_max)

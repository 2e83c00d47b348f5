"""Step-size bias and Richardson extrapolation, against the linear–Gaussian closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from bayes_susc.checks.ground_truth import (
    LinearGaussianProblem,
    sgld_stationary_cov,
    simulate_sgld,
    torch_local_posterior,
)
from bayes_susc.checks.step_size_bias import (
    extrapolate,
    richardson_weights,
    sgld_variance_inflation,
    step_size_study,
    stiffest_curvature,
)
from bayes_susc.estimation.susceptibility import estimate


@pytest.fixture(scope="module")
def problem() -> LinearGaussianProblem:
    # Literature defaults: nβ = 30, γ = 300.
    return LinearGaussianProblem.make(p=6, free=[0, 2, 5], n_eval=100, n_probe=8, seed=7)


def _as_estimate(chi: np.ndarray, se: np.ndarray) -> xr.Dataset:
    return xr.Dataset(
        {
            "chi": ("probe", chi),
            "se": ("probe", se),
            "ci_low": ("probe", chi - 1.96 * se),
            "ci_high": ("probe", chi + 1.96 * se),
        }
    )


def test_weights_are_the_lagrange_values_at_zero():
    np.testing.assert_allclose(richardson_weights([1e-3, 5e-4]), [-1.0, 2.0])
    np.testing.assert_allclose(richardson_weights([1.0, 0.5, 0.25]), [1 / 3, -2.0, 8 / 3])
    # Exact on polynomials of degree k - 1 in ε.
    eps = np.array([0.3, 0.2, 0.07])
    values = 1.5 - 2.0 * eps + 4.0 * eps**2
    assert richardson_weights(eps) @ values == pytest.approx(1.5, rel=1e-12)


def test_closed_form_extrapolation_beats_the_plain_chain_at_the_default_step(problem):
    """The exact chain χ at ε = 1e-3 is ≈ 10% off the posterior; Richardson removes most."""
    eps = 1e-3
    post = problem.chi_posterior()
    plain = problem.chi_sgld(eps)
    zero_se = np.zeros_like(plain)
    runs = [_as_estimate(plain, zero_se), _as_estimate(problem.chi_sgld(eps / 2), zero_se)]
    extrap = extrapolate(runs, [eps, eps / 2])["chi"].values
    plain_err = np.abs(plain - post)
    assert np.all(plain_err / np.abs(post) > 0.03)  # the bias is real at the defaults
    assert np.all(np.abs(extrap - post) < 0.1 * plain_err)  # second order: ≥ 10× smaller
    three = extrapolate(
        runs + [_as_estimate(problem.chi_sgld(eps / 4), zero_se)], [eps, eps / 2, eps / 4]
    )["chi"].values
    assert np.all(np.abs(three - post) < np.abs(extrap - post))


def test_sampled_extrapolation_is_closer_to_the_posterior(problem):
    """Exact SGLD draws at ε and ε/2 (thinned to the same dynamical time per draw)."""
    rng = np.random.default_rng(3)
    eps = 1e-3
    estimates = []
    for step, k in ((eps, 10), (eps / 2, 20)):
        phi, delta = simulate_sgld(problem, step, (16,), 2000, k, rng)
        estimates.append(estimate({"phi": phi, "delta_loss": delta}))
    result = extrapolate(estimates, [eps, eps / 2])
    post = problem.chi_posterior()
    extrap_err = np.abs(result["chi"].values - post)
    plain_err = np.abs(result["chi_plain"].values - post)
    # Each entry: the posterior χ lies within 4 SE of the extrapolated estimate ...
    assert np.all(extrap_err < 4 * result["se"].values)
    # ... and on average the extrapolation is closer than the plain estimate, whose bias
    # (≈ 10%) is several standard errors here.
    assert extrap_err.mean() < plain_err.mean()
    assert np.all(
        np.abs(result["chi_plain"].values - problem.chi_sgld(eps)) < 4 * estimates[0]["se"].values
    )
    # The estimated bias tracks the exact one: χ(ε) − χ(0).
    exact_bias = problem.chi_sgld(eps) - post
    assert np.all(np.abs(result["bias"].values - exact_bias) < 4 * result["se"].values)


def test_bias_flag_marks_entries_whose_interval_misses_the_bias():
    chi_big = np.array([1.0, 1.0])
    runs = [
        _as_estimate(chi_big, np.array([0.01, 0.5])),
        _as_estimate(np.array([0.9, 0.9]), np.array([0.01, 0.5])),
    ]
    out = extrapolate(runs, [1e-3, 5e-4])
    np.testing.assert_allclose(out["chi"].values, [0.8, 0.8])
    np.testing.assert_allclose(out["bias"].values, [0.2, 0.2])
    assert out["bias_exceeds_interval"].values.tolist() == [True, False]
    np.testing.assert_allclose(out["se"].values, np.sqrt(5) * np.array([0.01, 0.5]))


def test_step_size_study_runs_the_sampler_at_each_step(problem):
    posterior, eval_data, probe_data = torch_local_posterior(problem)
    result, runs = step_size_study(
        posterior,
        "sgld",
        step_size=2e-3,
        factors=(1.0, 0.5),
        num_burnin=20,
        steps_per_draw=2,
        eval_data=eval_data,
        probe_data=probe_data,
        num_chains=2,
        num_draws=10,
        progress=False,
    )
    steps = [run.posterior.attrs["step_size"] for run in runs]
    assert steps == [2e-3, 1e-3]
    configs = [run.posterior.attrs["bayes_susc_config"] for run in runs]
    assert '"steps_per_draw": 2' in configs[0] and '"steps_per_draw": 4' in configs[1]
    assert '"num_burnin": 40' in configs[1]
    assert result["chi"].shape == (problem.X_probe.shape[0],)
    assert np.isfinite(result["chi"].values).all()


@pytest.mark.parametrize(
    "step_sizes, match",
    [([1e-3], "at least two"), ([1e-3, 1e-3], "distinct"), ([1e-3, -1.0], "step_sizes")],
)
def test_bad_step_sizes(step_sizes, match):
    with pytest.raises(ValueError, match=match):
        richardson_weights(step_sizes)


def test_mismatched_estimates_rejected():
    a = _as_estimate(np.ones(3), np.ones(3))
    b = _as_estimate(np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="same entries"):
        extrapolate([a, b], [1e-3, 5e-4])
    with pytest.raises(ValueError, match="pair up"):
        extrapolate([a], [1e-3, 5e-4])


def test_stiffest_curvature_is_the_top_eigenvalue_of_K(problem):
    posterior, _, _ = torch_local_posterior(problem)
    lam = np.linalg.eigvalsh(problem.K).max()
    assert stiffest_curvature(posterior) == pytest.approx(lam, rel=1e-5)


def test_variance_inflation_is_exact_along_the_stiffest_direction(problem):
    lam, vecs = np.linalg.eigh(problem.K)
    top = vecs[:, -1]
    for eps in (1e-4, 1e-3, 5e-3):
        stationary = top @ sgld_stationary_cov(problem.K, eps) @ top
        exact = stationary * lam[-1] - 1.0  # posterior variance along top is 1/λ
        assert sgld_variance_inflation(eps, lam[-1]) == pytest.approx(exact, rel=1e-9)
    assert sgld_variance_inflation(4.0 / lam[-1], lam[-1]) == float("inf")


def test_attach_bias_flags_entries_in_the_response_matrix(problem):
    from bayes_susc.checks.step_size_bias import attach_bias
    from bayes_susc.estimation.response_matrix import assign_status
    from bayes_susc.estimation.susceptibility import estimate_many

    rng = np.random.default_rng(11)
    eps = 1e-3
    per_step = []
    for step, k in ((eps, 10), (eps / 2, 20)):
        runs = {}
        for name in ("A", "B"):
            phi, delta = simulate_sgld(problem, step, (16,), 2000, k, rng)
            runs[name] = {"phi": phi, "delta_loss": delta}
        per_step.append(estimate_many(runs))
    matrix = assign_status(per_step[0])
    out = attach_bias(matrix, extrapolate(per_step, [eps, eps / 2]))
    flagged = out["bias_exceeds_interval"].values
    status = out["status"].values
    earlier = np.isin(status, ["diverged", "nonfinite", "rhat", "ess"])
    np.testing.assert_array_equal(status[flagged & ~earlier], "step_size_bias")
    assert not np.any(status[~flagged] == "step_size_bias")
    # The ≈ 10-19% bias at ε = 1e-3 is several interval half-widths here for most entries.
    assert flagged.mean() > 0.5
    exact_bias = problem.chi_sgld(eps) - problem.chi_posterior()
    # bias = χ(ε) − (2χ(ε/2) − χ(ε)) = 2(χ(ε) − χ(ε/2)): SE 2·sqrt(se₁² + se₂²).
    se_bias = 2 * np.sqrt(per_step[0]["se"].values ** 2 + per_step[1]["se"].values ** 2)
    assert np.all(np.abs(out["bias"].values - exact_bias[:, None]) < 4 * se_bias)
    with pytest.raises(ValueError, match="same"):
        attach_bias(matrix.isel(probe=slice(0, 3)), extrapolate(per_step, [eps, eps / 2]))

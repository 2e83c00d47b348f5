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
    extrapolate_draws,
    richardson_weights,
    run_seeds,
    sgld_variance_inflation,
    simulate_step_size_runs,
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


# --------------------------------------------------------------------------------------
# Issue 18: coupling of the runs, the extrapolated interval, the rule, explicit settings
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_problem() -> LinearGaussianProblem:
    # The problem of diagnostics/step_size_extrapolation.py.
    return LinearGaussianProblem.make(p=6, free=[0, 2, 5], n_eval=100, n_probe=8, seed=1)


def _pooled_chi(phi: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """χ̂ of every replication at once: phi (rep, chain, draw), delta (..., probe)."""
    n = phi.shape[1] * phi.shape[2]
    dphi = phi - phi.mean(axis=(1, 2), keepdims=True)
    ddl = delta - delta.mean(axis=(1, 2), keepdims=True)
    return -np.einsum("rcd,rcdp->rp", dphi, ddl) / (n - 1)


def _extrapolated(problem, coupling, reps, draws, seed, step=1e-3):
    """extrapolate_draws on every replication of simulated runs at (step, step/2)."""
    rng = np.random.default_rng(seed)
    (p1, d1), (p2, d2) = simulate_step_size_runs(
        problem, step, (1.0, 0.5), (reps, 4), draws, 1, 150, rng, coupling
    )
    return [
        extrapolate_draws(
            [{"phi": p1[r], "delta_loss": d1[r]}, {"phi": p2[r], "delta_loss": d2[r]}],
            [step, step / 2],
        )
        for r in range(reps)
    ]


def test_run_seeds_are_distinct_deterministic_and_keep_the_users_seed():
    seeds = run_seeds(7, 3)
    assert seeds[0] == 7 and len(set(seeds)) == 3
    assert run_seeds(7, 3) == seeds and run_seeds(8, 3)[1:] != seeds[1:]
    with pytest.raises(ValueError, match="seed"):
        run_seeds(-1, 2)


def test_independent_runs_have_uncorrelated_estimates(study_problem):
    """Over 120 replications at 4 × 1000 draws the two runs' χ̂ are uncorrelated (each
    entry's sample correlation has SE ≈ 0.09, their mean ≈ 0.06); the pre-issue-18
    shared seed is not (ρ ≈ 0.55 here), so the test can tell them apart."""
    rhos = {}
    for coupling in ("independent", "shared_seed"):
        rng = np.random.default_rng(21)
        (p1, d1), (p2, d2) = simulate_step_size_runs(
            study_problem, 1e-3, (1.0, 0.5), (120, 4), 1000, 1, 150, rng, coupling
        )
        a, b = _pooled_chi(p1, d1), _pooled_chi(p2, d2)
        rhos[coupling] = np.array([np.corrcoef(a[:, i], b[:, i])[0, 1] for i in range(8)])
    assert abs(rhos["independent"].mean()) < 0.2
    assert np.all(np.abs(rhos["independent"]) < 0.35)  # ≈ 3.8 SE per entry
    assert rhos["shared_seed"].mean() > 0.35


def test_common_coupling_se_is_the_spread_of_the_extrapolated_chi(study_problem):
    """CRN: ρ ≈ 1 between the runs, and the SE from the combined series equals the SD of
    the extrapolated χ̂ over 60 replications (SD's relative MC error ≈ 0.1; ess_t's SE
    runs ≈ 10% low at this length, as for a single run)."""
    results = _extrapolated(study_problem, "common", 60, 400, seed=4)
    chi = np.array([r["chi"].values for r in results])
    se = np.array([r["se"].values for r in results])
    ratio = np.median(se, axis=0) / chi.std(axis=0, ddof=1)
    assert 0.7 < np.median(ratio) < 1.2
    assert np.all((ratio > 0.5) & (ratio < 1.6))
    runs = np.array([r["chi_runs"].values for r in results])
    emp = [np.corrcoef(runs[:, 0, i], runs[:, 1, i])[0, 1] for i in range(8)]
    assert min(emp) > 0.95
    est = np.array([r["run_correlation"].values[0, 1] for r in results])
    assert np.median(est) > 0.95
    # The payoff: the extrapolated SE is about the plain one (independent runs: ≈ √5×).
    se_plain = np.array([r["se_plain"].values for r in results])
    assert np.median(se / se_plain) < 1.2


def test_extrapolated_interval_covers_the_posterior_chi(study_problem):
    """40 replications × 8 entries at 4 × 2000 draws, common coupling: coverage of the
    posterior χ within 3 cluster-robust SE (replications as clusters; at least the
    binomial SE) of 0.95. The plain interval, whose bias is several SE at this length,
    covers the posterior less (0.84 in the diagnostics report)."""
    results = _extrapolated(study_problem, "common", 40, 2000, seed=8)
    post = study_problem.chi_posterior()
    hits = np.array([(r["ci_low"].values <= post) & (post <= r["ci_high"].values) for r in results])
    plain = np.array(
        [(r["ci_low_plain"].values <= post) & (post <= r["ci_high_plain"].values) for r in results]
    )
    p = hits.mean()
    resid = hits.sum(axis=1) - p * hits.shape[1]
    g = hits.shape[0]
    se_cluster = np.sqrt(g / (g - 1) * np.sum(resid**2)) / hits.size
    tol = 3 * max(se_cluster, np.sqrt(0.95 * 0.05 / hits.size))
    assert abs(p - 0.95) < tol, (p, tol)
    assert plain.mean() < 0.9  # 0.84 at this length (diagnostics report)


def test_the_rule_says_when_extrapolation_pays(study_problem):
    """Independent runs (extrapolated SE ≈ √5 × plain). Short runs at ε = 1e-3 (4 × 200:
    SE ≈ 20-30% of χ, bias ≈ 10%; actual MSE ratio extrapolated/plain ≈ 3.8) → mostly
    does not pay; long runs at ε = 3e-3 (4 × 4000: SE ≈ 4%, bias ≈ 30%; ratio ≈ 0.1) →
    pays."""
    post = study_problem.chi_posterior()
    for step, draws, reps, expect, most in (
        (1e-3, 200, 30, False, 0.6),
        (3e-3, 4000, 16, True, 0.9),
    ):
        results = _extrapolated(study_problem, "independent", reps, draws, seed=5, step=step)
        pays = np.array([bool(r["extrapolation_pays"]) for r in results])
        # Over 100 replications: 0.69–0.77 and 1.00 of the answers are these.
        assert (pays == expect).mean() >= most, (step, draws, pays.mean())
        plain = np.array([r["chi_plain"].values for r in results])
        extrap = np.array([r["chi"].values for r in results])
        mse_plain, mse_ex = ((plain - post) ** 2).mean(), ((extrap - post) ** 2).mean()
        assert (mse_ex < mse_plain) == expect  # the rule's answer is the right one
        if expect:
            # bias ≫ SE: the estimated plain RMSE is the actual one (bias-dominated).
            est_plain = np.mean([float(r["pooled_rmse_plain"]) ** 2 for r in results])
            assert 0.7 < est_plain / mse_plain < 2.0


def test_rule_fields_from_estimates_are_the_stated_formulas():
    """extrapolate() on independent runs: bias_se² = 4(se₁² + se₂²), rmse_plain² =
    se₁² + max(bias² − bias_se², 0), pooled decision over the entries."""
    se = np.array([0.01, 0.01, 0.01])
    runs = [
        _as_estimate(np.array([1.0, 1.0, 1.0]), se),
        _as_estimate(np.array([0.9, 0.995, 1.0]), se),
    ]
    out = extrapolate(runs, [1e-3, 5e-4])
    np.testing.assert_allclose(out["bias"].values, [0.2, 0.01, 0.0], atol=1e-12)
    np.testing.assert_allclose(out["bias_se"].values, np.sqrt(8) * 0.01)
    bias2 = np.clip(np.array([0.2, 0.01, 0.0]) ** 2 - 8e-4, 0, None)
    np.testing.assert_allclose(out["rmse_plain"].values, np.sqrt(1e-4 + bias2))
    np.testing.assert_allclose(out["rmse_extrapolated"].values, np.sqrt(5) * 0.01)
    # Pooled: mean(1e-4 + b̂² − 8e-4) = 1e-4 + (0.04 + 1e-4)/3 − 8e-4 > 5e-4 → pays,
    assert bool(out["extrapolation_pays"])
    # while a bias of 0.05 (1.8 SE_b) on one entry only does not: mean b̂² = 8.3e-4 is
    # below SE_extrap² − SE_plain² + SE_b² = 5e-4 − 1e-4 + 8e-4.
    runs[1] = _as_estimate(np.array([0.975, 1.0, 1.0]), se)
    assert not bool(extrapolate(runs, [1e-3, 5e-4])["extrapolation_pays"])


def test_step_size_study_couples_the_noise_by_default(problem):
    posterior, eval_data, probe_data = torch_local_posterior(problem)
    kwargs = dict(
        eval_data=eval_data,
        probe_data=probe_data,
        num_chains=2,
        num_draws=40,
        num_burnin=20,
        seed=5,
        progress=False,
    )
    common, runs = step_size_study(posterior, "sgld", **kwargs)
    assert common.attrs["coupling"] == "common" and common.attrs["seeds"] == [5, 5]
    assert [r.posterior.attrs["noise_draws_per_step"] for r in runs] == [2, 1]
    phi = [r.posterior["phi"].values.ravel() for r in runs]
    # Same Brownian path, different step: close, not equal.
    assert np.corrcoef(*phi)[0, 1] > 0.95 and not np.allclose(*phi)
    indep, runs = step_size_study(posterior, "sgld", coupling="independent", **kwargs)
    assert indep.attrs["seeds"] == run_seeds(5, 2)
    assert [r.posterior.attrs["seed"] for r in runs] == run_seeds(5, 2)
    phi = [r.posterior["phi"].values.ravel() for r in runs]
    assert abs(np.corrcoef(*phi)[0, 1]) < 0.5
    # The run at factor 1 is the user's ordinary run with that seed.
    from bayes_susc import sample

    plain = sample(posterior, "sgld", step_size=1e-3, **kwargs)
    np.testing.assert_allclose(plain.posterior["phi"].values, runs[0].posterior["phi"].values)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"num_draws": 1}, "num_draws"),
        ({"num_chains": 0}, "num_chains"),
        ({"num_burnin": -1}, "num_burnin"),
        ({"steps_per_draw": 0}, "steps_per_draw"),
        ({"seed": -1}, "seed"),
        ({"step_size": 0.0}, "step_size"),
        ({"factors": (1.0,)}, "factors"),
        ({"factors": (1.0, 1.0)}, "factors"),
        ({"factors": (1.0, -0.5)}, "factors"),
        ({"coupling": "sometimes"}, "coupling"),
        ({"confidence": 1.5}, "confidence"),
        ({"chain_method": "parallel"}, "chain_method"),
        ({"eval_data": None}, "eval_data"),
        ({"kernel": "nope"}, "kernel"),
        ({"kernel_kwargs": {"friction": 1.0}}, "kernel_kwargs"),
        ({"kernel_kwargs": {"step_size": 1e-4}}, "kernel_kwargs"),
        ({"kernel": "mala", "coupling": "common"}, "coupling"),
        ({"factors": (1.0, 0.6), "coupling": "common"}, "coupling"),
        ({"steps_per_draw": 3, "factors": (1.0, 2.0), "coupling": "common"}, "coupling"),
    ],
)
def test_bad_study_arguments_fail_before_sampling(problem, monkeypatch, override, match):
    import bayes_susc.sampling.driver as driver

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before validating")

    monkeypatch.setattr(driver, "sample", no_sampling)
    posterior, eval_data, probe_data = torch_local_posterior(problem)
    args = dict(eval_data=eval_data, probe_data=probe_data, num_draws=10, progress=False)
    args.update(override)
    kernel = args.pop("kernel", "sgld")
    with pytest.raises(ValueError, match=match):
        step_size_study(posterior, kernel, **args)


def test_auto_coupling_falls_back_to_independent_runs(problem, monkeypatch):
    """Where common coupling cannot apply (MALA draws uniforms), "auto" gives the runs
    independent seeds and unwrapped kernels, and says why."""
    from types import SimpleNamespace

    import bayes_susc.sampling.driver as driver

    calls = []

    def fake_sample(posterior, kernel, **kwargs):
        calls.append((kernel, kwargs["seed"]))
        if len(calls) == 2:
            raise RuntimeError("stop")
        return SimpleNamespace(posterior=SimpleNamespace(attrs={}))

    monkeypatch.setattr(driver, "sample", fake_sample)
    posterior, eval_data, probe_data = torch_local_posterior(problem)
    with pytest.raises(RuntimeError, match="stop"):
        step_size_study(
            posterior, "mala", eval_data=eval_data, probe_data=probe_data, seed=3, progress=False
        )
    assert [seed for _, seed in calls] == run_seeds(3, 2)
    assert all(kernel.name == "mala" and not hasattr(kernel, "inner") for kernel, _ in calls)

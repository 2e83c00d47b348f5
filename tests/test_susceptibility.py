"""Susceptibility estimates, intervals and convergence against exact answers.

Ground truth is the linear–Gaussian model (DESIGN.md §5): full-batch SGLD on its
quadratic potential has an exact stationary law, so the χ a chain estimates is a closed
form (``problem.chi(sgld_stationary_cov(K, ε))``), and so is the posterior χ it tends to
as ε → 0. One test samples through :func:`bayes_susc.sample`; the others simulate the
same SGLD recursion δ' = (I − εK/2)δ + √ε ξ exactly in numpy (thinned by k steps:
δ_{t+k} = A^k δ_t + N(0, S − A^k S A^kᵀ), started from the stationary law S), which is
fast enough for many draws and replications.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import xarray as xr
from scipy import special, stats
from synthetic import ar1

from bayes_susc import DivergenceWarning, sample
from bayes_susc.checks import ground_truth
from bayes_susc.checks.ground_truth import LinearGaussianProblem, sgld_stationary_cov
from bayes_susc.estimation import convergence
from bayes_susc.estimation.susceptibility import (
    METHODS,
    estimate,
    estimate_many,
    optimal_block_length,
    pooled_chi,
    product_series,
    resample_weights,
    resampled_chi,
    susceptibility,
)
from bayes_susc.storage.draws import available_backends, make_inference_data

# Seed 7 gives 8 probe items whose posterior χ are all at least 17% of the largest in
# size, so per-entry relative errors are meaningful (with seed 1 one χ is ~0).
PROBLEM_SEED = 7


@pytest.fixture(scope="module")
def problem() -> LinearGaussianProblem:
    return LinearGaussianProblem.make(p=6, free=[0, 2, 5], n_eval=100, n_probe=8, seed=PROBLEM_SEED)


def simulate_sgld(pr, step_size, num_chains, num_draws, steps_per_draw, rng):
    """Exact thinned full-batch SGLD draws: φ (chain, draw), ΔL (chain, draw, probe)."""
    return ground_truth.simulate_sgld(pr, step_size, (num_chains,), num_draws, steps_per_draw, rng)


def random_draws(seed: int = 0, chains: int = 4, draws: int = 200, probes: int = 12):
    rng = np.random.default_rng(seed)
    phi = ar1(rng, (chains, draws), 0.6)
    delta = 0.4 * phi[..., None] * rng.standard_normal(probes) + ar1(
        rng, (chains, draws, probes), 0.5
    )
    return phi, delta


def covered(ds: xr.Dataset, truth: np.ndarray) -> np.ndarray:
    return (ds["ci_low"].values <= truth) & (truth <= ds["ci_high"].values)


# ---------------------------------------------------------------------------- exact χ


def _linear_model_posterior(pr: LinearGaussianProblem):
    return ground_truth.torch_local_posterior(pr)


def test_sample_covers_exact_chain_chi(problem):
    """Through bayes_susc.sample: the interval covers the chain's exact χ.

    How unlikely a failure is: 400 numpy replications of exactly this setting (16 chains
    × 200 draws, 2 steps per draw, ε = 2e-3, same problem and defaults) gave
    P(some |χ̂ − χ| > 4 SE) = 0.75% and P(≥ 2 of 8 entries outside the 99.9% interval)
    = 1.0%. Misses are strongly clustered (all entries share φ), so "at most one miss"
    is the meaningful bound; at 95% the coverage was 0.93.
    """
    eps = 2e-3
    post, eval_data, probe_data = _linear_model_posterior(problem)
    data = sample(
        post,
        "sgld",
        eval_data=eval_data,
        probe_data=probe_data,
        num_chains=16,
        num_draws=200,
        num_burnin=50,  # from δ = 0, the slowest mode decays by 0.85 per step
        steps_per_draw=2,
        step_size=eps,
        seed=3,
        progress=False,
    )
    exact = problem.chi(sgld_stationary_cov(problem.K, eps))
    ds = estimate(data, confidence=0.999, n_resamples=4000, seed=0)
    assert int(ds["num_diverged_chains"]) == 0 and int(ds["num_draws"]) == 3200
    assert covered(ds, exact).sum() >= 7, (ds["chi"].values, exact)
    z = (ds["chi"].values - exact) / ds["se"].values
    assert np.all(np.abs(z) < 4), z
    # The chain's χ at this step size is measurably not the posterior's: over sample
    # seeds 0–29, Σ z² against the posterior χ ranged 49–213 (against the exact chain
    # χ: 0.4–32).
    z_post = (ds["chi"].values - problem.chi_posterior()) / ds["se"].values
    assert np.sum(z_post**2) > 35, z_post
    assert np.all(ds["rhat"].values < 1.01) and np.all(ds["ess_bulk"].values > 1000)
    np.testing.assert_allclose(ds["chi"].values, susceptibility(data).values, rtol=1e-12)


def test_relative_error_against_posterior_at_small_step(problem):
    """ε = 5e-5: the closed-form bias is below 0.9% for every entry, and with 64 × 8000
    draws the standard errors are below 1%, so a 5% bound holds with > 4 SE to spare."""
    eps = 5e-5
    lam_min = np.linalg.eigvalsh(problem.K)[0]
    k = round(2 / (eps * lam_min))  # one relaxation time of the slowest mode per draw
    phi, delta = simulate_sgld(problem, eps, 64, 8000, k, np.random.default_rng(11))
    ds = estimate({"phi": phi, "delta_loss": delta}, method="batch_means")
    chi_post, chi_chain = problem.chi_posterior(), problem.chi_sgld(eps)
    assert np.all(np.abs(chi_chain / chi_post - 1) < 0.009)
    assert np.all(ds["se"].values < 0.01 * np.abs(chi_post))
    rel = np.abs(ds["chi"].values / chi_post - 1)
    assert np.all(rel < 0.05), rel
    assert np.all(np.abs(ds["chi"].values - chi_chain) < 4 * ds["se"].values)


def test_bias_against_posterior_shrinks_with_step_size(problem):
    """At ε = 4e-3, 2e-3, 1e-3 the estimates track the exact chain χ (within 4 SE) and
    their distance to the posterior χ shrinks with ε, at about first order."""
    chi_post = problem.chi_posterior()
    lam_min = np.linalg.eigvalsh(problem.K)[0]
    rng = np.random.default_rng(12)
    est_bias, exact_bias = [], []
    for eps in (4e-3, 2e-3, 1e-3):
        k = max(1, round(2 / (eps * lam_min)))
        phi, delta = simulate_sgld(problem, eps, 32, 4000, k, rng)
        ds = estimate({"phi": phi, "delta_loss": delta}, method="batch_means")
        chi_chain = problem.chi_sgld(eps)
        assert np.all(np.abs(ds["chi"].values - chi_chain) < 4 * ds["se"].values), eps
        est_bias.append(np.abs(ds["chi"].values - chi_post))
        exact_bias.append(np.abs(chi_chain - chi_post))
    est_bias, exact_bias = np.array(est_bias), np.array(exact_bias)
    assert np.all(np.diff(exact_bias, axis=0) < 0)
    assert np.all(np.diff(est_bias, axis=0) < 0), est_bias  # every entry, every halving
    # Halving ε about halves the bias (the O(ε²) remainder makes the first ratio larger).
    ratios = est_bias[:-1] / est_bias[1:]
    assert np.all((ratios > 1.5) & (ratios < 4.0)), ratios
    assert np.all(est_bias[-1] < 0.25 * est_bias[0])


def test_interval_coverage_in_a_replication_study(problem):
    """200 replications of 4 chains × 200 draws of SGLD (ε = 1e-3, bulk ESS ≈ 235 of 800).

    Coverage of nominal 95% intervals in this setting (diagnostics/reports/coverage,
    setting D200_k1, other data): ess_t 0.943, batch means 0.901, ESS 0.888, stationary
    0.871, moving block 0.864, iid 0.637; standard error ≈ 0.017 per method (from
    per-replication means; misses cluster within a replication). The thresholds sit
    > 4 such errors away: the autocorrelation-aware methods come close to nominal at
    this small ESS, the naive bootstrap does not.
    """
    rng = np.random.default_rng(21)
    runs = {}
    for r in range(200):
        phi, delta = simulate_sgld(problem, 1e-3, 4, 200, 1, rng)
        runs[f"rep{r}"] = {"phi": phi, "delta_loss": delta}
    exact = problem.chi_sgld(1e-3)[:, None]
    rate = {}
    for method in METHODS:
        ds = estimate_many(runs, method=method, n_resamples=500, seed=1)
        rate[method] = covered(ds, exact).mean()
    for method in ("ess_t", "stationary_bootstrap", "moving_block_bootstrap", "batch_means", "ess"):
        assert 0.78 < rate[method] < 0.99, rate
        assert rate[method] > rate["iid_bootstrap"] + 0.15, rate
    assert rate["iid_bootstrap"] < 0.70, rate


# ---------------------------------------------------------------- exactness properties


def test_data_set_chi_is_mean_of_item_chi_exactly():
    phi, delta = random_draws(seed=1, probes=12)
    labels = np.array(["code", "prose", "math"])[np.arange(12) % 3]
    post = xr.Dataset(
        {
            "phi": (("chain", "draw"), phi),
            "delta_loss": (("chain", "draw", "probe"), delta),
        },
        coords={"probe": np.arange(12), "dataset": ("probe", labels)},
    )
    items = estimate(post, method="iid_bootstrap")
    sets = estimate(post, groups="dataset", method="iid_bootstrap")
    assert list(sets["probe"].values) == ["code", "math", "prose"]
    assert list(sets["num_items"].values) == [4, 4, 4]
    for name in sets["probe"].values:
        mean = items["chi"].values[labels == name].mean()
        assert sets["chi"].sel(probe=name).item() == pytest.approx(mean, rel=1e-12, abs=1e-15)
    # A mapping (with overlapping sets) and a label array give the same numbers.
    by_map = estimate(post, groups={"cm": [0, 2, 3, 5], "all": np.ones(12, bool)})
    assert by_map["chi"].sel(probe="cm").item() == pytest.approx(
        items["chi"].values[[0, 2, 3, 5]].mean(), rel=1e-12
    )
    assert by_map["chi"].sel(probe="all").item() == pytest.approx(
        items["chi"].values.mean(), rel=1e-12
    )
    by_labels = estimate(post, groups=labels, method="iid_bootstrap")
    np.testing.assert_array_equal(by_labels["chi"].values, sets["chi"].values)
    np.testing.assert_array_equal(by_labels["se"].values, sets["se"].values)

    # Every bootstrap resample: the set's resampled χ is the mean of its items'.
    A = (labels[:, None] == np.array(["code", "math", "prose"])) / 4.0
    for method in ("stationary_bootstrap", "moving_block_bootstrap", "iid_bootstrap"):
        w = resample_weights(method, 4, 200, n_resamples=300, block_length=5.0, seed=2)
        per_item = resampled_chi(phi, delta, w)
        per_set = resampled_chi(phi, delta @ A, w)
        scale = np.abs(per_item).max()
        np.testing.assert_allclose(per_set, per_item @ A, rtol=1e-12, atol=1e-13 * scale)
        # The renormalized estimator is linear in (ΔL, m) too.
        m = delta.mean(axis=(0, 1)) + 0.1
        np.testing.assert_allclose(
            resampled_chi(phi, delta @ A, w, mean_delta_loss=m @ A),
            resampled_chi(phi, delta, w, mean_delta_loss=m) @ A,
            rtol=1e-12,
            atol=1e-13 * scale,
        )
    # estimate() uses exactly these resamples: its SE is their sd.
    w = resample_weights("stationary_bootstrap", 4, 200, n_resamples=300, block_length=5.0, seed=2)
    ds = estimate(
        post,
        method="stationary_bootstrap",
        groups="dataset",
        block_length=5.0,
        n_resamples=300,
        seed=2,
    )
    np.testing.assert_allclose(
        ds["se"].values, resampled_chi(phi, delta @ A, w).std(axis=0, ddof=1), rtol=1e-10
    )
    assert float(ds["block_length"]) == 5.0


def test_pooled_chi_matches_covariance_and_keeps_probe_coords():
    phi, delta = random_draws(seed=2)
    flat_phi, flat_delta = phi.reshape(-1), delta.reshape(-1, delta.shape[-1])
    expected = -np.array([np.cov(flat_phi, flat_delta[:, i])[0, 1] for i in range(12)])
    np.testing.assert_allclose(pooled_chi(phi, delta), expected, rtol=1e-12)
    # probe_loss − eval_loss, as a sampling result stores them.
    eval_loss = 3.0 + 0.1 * phi
    posterior = xr.Dataset(
        {
            "phi": (("chain", "draw"), phi),
            "eval_loss": (("chain", "draw"), eval_loss),
            "probe_loss": (("chain", "draw", "probe"), delta + eval_loss[..., None]),
        },
        coords={"probe": np.arange(12), "token": ("probe", list("abcdefghijkl"))},
    )
    for backend in available_backends():  # InferenceData only under ArviZ 0.x
        idata = make_inference_data({"posterior": posterior}, backend)
        chi = susceptibility(idata)
        np.testing.assert_allclose(chi.values, expected, rtol=1e-10)
        assert list(chi["token"].values) == list("abcdefghijkl")
        assert chi.attrs["num_diverged_chains"] == 0
        ds = estimate(idata, method="ess")
        np.testing.assert_allclose(ds["chi"].values, expected, rtol=1e-10)
        assert list(ds["token"].values) == list("abcdefghijkl")


def test_renormalized_estimator():
    phi, delta = random_draws(seed=3)
    data = {"phi": phi, "delta_loss": delta}
    n = phi.size
    own = delta.mean(axis=(0, 1))
    before = delta.copy()
    plain = estimate(data, method="stationary_bootstrap", block_length=4.0)
    np.testing.assert_array_equal(delta, before)  # the caller's arrays are left alone
    same = estimate(data, method="stationary_bootstrap", block_length=4.0, renormalized_from=own)
    assert same.attrs["estimator"] == "renormalized" and plain.attrs["estimator"] == "pooled"
    np.testing.assert_allclose(same["chi"].values, plain["chi"].values, rtol=1e-12)
    # Only the point estimates coincide: a resample of the renormalized form keeps m and
    # the uncentred φ, the pooled one re-centres with the resample's own means.
    np.testing.assert_allclose(same["se"].values, plain["se"].values, rtol=0.05)
    # Another run's means: χ moves by −n/(n−1)·φ̄·(ΔL̄ − m), φ not centred.
    other_phi, other_delta = random_draws(seed=4)
    other_delta = other_delta + 0.3
    m = other_delta.mean(axis=(0, 1))
    unrestricted = xr.Dataset(
        {
            "phi": (("chain", "draw"), other_phi),
            "delta_loss": (("chain", "draw", "probe"), other_delta),
        }
    )
    renorm = estimate(data, renormalized_from=unrestricted, method="ess")
    shift = -n / (n - 1) * phi.mean() * (own - m)
    np.testing.assert_allclose(renorm["chi"].values, plain["chi"].values + shift, rtol=1e-10)
    np.testing.assert_allclose(
        renorm["chi"].values, pooled_chi(phi, delta, mean_delta_loss=m), rtol=1e-12
    )
    np.testing.assert_allclose(
        renorm["chi"].values, -(phi[..., None] * (delta - m)).sum(axis=(0, 1)) / (n - 1)
    )
    # Its product series is φ(ΔL − m): the convergence columns describe that series.
    series = product_series(phi, delta, mean_delta_loss=m)
    np.testing.assert_allclose(renorm["rhat"].values, convergence.rhat(series), rtol=1e-12)


def test_diverged_chains_are_excluded_and_counted():
    phi, delta = random_draws(seed=5, chains=5)
    bad_phi, bad_delta = phi.copy(), delta.copy()
    bad_phi[2, 120:] = np.nan  # chain 2 diverged at draw 120: NaN from then on
    bad_delta[2, 120:] = np.nan
    ds = estimate({"phi": bad_phi, "delta_loss": bad_delta}, method="batch_means")
    ref = estimate({"phi": np.delete(phi, 2, 0), "delta_loss": np.delete(delta, 2, 0)})
    np.testing.assert_allclose(ds["chi"].values, ref["chi"].values, rtol=1e-12)
    assert int(ds["num_diverged_chains"]) == 1 and int(ds["num_draws"]) == 800
    assert np.all(np.isfinite(ds[["se", "rhat", "ess_bulk", "mcse"]].to_array().values))
    with pytest.warns(DivergenceWarning, match="1 of 5 chain"):
        np.testing.assert_allclose(pooled_chi(bad_phi, bad_delta), ref["chi"].values, rtol=1e-12)
    # A chain flagged in sample_stats.diverged is excluded even where its draws are finite.
    idata = make_inference_data(
        {
            "posterior": xr.Dataset(
                {
                    "phi": (("chain", "draw"), phi),
                    "delta_loss": (("chain", "draw", "probe"), delta),
                }
            ),
            "sample_stats": xr.Dataset(
                {"diverged": (("chain", "draw"), np.arange(5)[:, None] == np.full((5, 200), 2))}
            ),
        }
    )
    flagged = susceptibility(idata)
    assert flagged.attrs["num_diverged_chains"] == 1
    np.testing.assert_allclose(flagged.values, ref["chi"].values, rtol=1e-12)
    # Bootstraps too: all resamples of the other chains, none from chain 2.
    boot = estimate(idata, method="stationary_bootstrap", block_length=3.0)
    assert int(boot["num_diverged_chains"]) == 1 and np.all(np.isfinite(boot["se"].values))
    all_bad = bad_phi.copy()
    all_bad[:, 3:] = np.nan
    with pytest.raises(ValueError, match="fewer than two finite draws"):
        estimate({"phi": all_bad, "delta_loss": delta})


def test_joint_resampling_across_components_and_entries():
    phi1, delta1 = random_draws(seed=6)
    phi2, delta2 = random_draws(seed=7)
    one = {"phi": phi1, "delta_loss": delta1}
    two = {"phi": phi2, "delta_loss": delta2}
    # Two identical components get identical resampled χ: same indices for both.
    twin = estimate_many({"a": one, "b": one})
    for var in ("se", "ci_low", "ci_high", "p_value"):  # (BLAS may reorder sums: 1e-13)
        np.testing.assert_allclose(
            twin[var].sel(component="a"), twin[var].sel(component="b"), rtol=1e-13
        )
    # The response matrix is the single-component estimates side by side (shared counts).
    bad_phi, bad_delta = phi2.copy(), delta2.copy()
    bad_phi[1, 50:] = np.nan
    bad_delta[1, 50:] = np.nan
    three = {"phi": bad_phi, "delta_loss": bad_delta}
    for method in ("stationary_bootstrap", "moving_block_bootstrap", "iid_bootstrap"):
        many = estimate_many({"a": one, "b": two, "c": three}, method=method, block_length=6.0)
        assert many["chi"].dims == ("probe", "component")
        assert list(many["num_diverged_chains"].values) == [0, 0, 1]
        for name, data in (("a", one), ("b", two), ("c", three)):
            single = estimate(data, method=method, block_length=6.0)
            for var in ("chi", "se", "ci_low", "ci_high", "rhat", "mcse"):
                np.testing.assert_allclose(
                    many[var].sel(component=name), single[var], rtol=1e-12, err_msg=var
                )
    # Counts: reproducible, N per resample, blocks inside chains.
    w = resample_weights("moving_block_bootstrap", 3, 50, n_resamples=120, block_length=7.0)
    np.testing.assert_array_equal(
        w, resample_weights("moving_block_bootstrap", 3, 50, n_resamples=120, block_length=7.0)
    )
    assert w.shape == (120, 3, 50) and np.all(w.sum(axis=(1, 2)) == 150)
    assert not np.array_equal(
        w,
        resample_weights("moving_block_bootstrap", 3, 50, n_resamples=120, block_length=7, seed=1),
    )
    # A length-50 block can only be a whole chain: counts are multiples of a chain's 1s.
    whole = resample_weights("moving_block_bootstrap", 3, 50, n_resamples=40, block_length=50)
    assert np.all(whole == whole[:, :, :1])
    # Resample r does not depend on how many are drawn.
    np.testing.assert_array_equal(
        resample_weights("stationary_bootstrap", 3, 50, n_resamples=75, block_length=4.0)[:60],
        resample_weights("stationary_bootstrap", 3, 50, n_resamples=60, block_length=4.0),
    )


def test_block_methods_wider_than_iid_on_autocorrelated_series():
    """φ and ΔL AR(1) with ρ = 0.95 and Cov(φ, ΔL) = 0.6 (χ = −0.6): the product series
    has lag-k autocorrelation ρ^{2k}, a variance inflation (1 + ρ²)/(1 − ρ²) ≈ 19.5, so
    honest intervals are ≈ 4.4 times the naive one."""
    rng = np.random.default_rng(8)
    rho, a = 0.95, 0.6
    x = ar1(rng, (4, 1000), rho)
    u = ar1(rng, (4, 1000), rho)
    data = {"phi": x, "delta_loss": (a * x + math.sqrt(1 - a**2) * u)[..., None]}
    width = {}
    for method in METHODS:
        ds = estimate(data, method=method)
        width[method] = (ds["ci_high"] - ds["ci_low"]).item()
        if method != "iid_bootstrap":
            assert abs(ds["chi"].item() + a) < 4 * ds["se"].item(), method
    for method in ("ess_t", "stationary_bootstrap", "moving_block_bootstrap", "batch_means", "ess"):
        assert width[method] > 2.5 * width["iid_bootstrap"], width


def test_politis_white_rule():
    rng = np.random.default_rng(9)
    rho, chains, draws = 0.5, 4, 5000
    x = ar1(rng, (chains, draws, 3), rho)
    b_sb, b_cb = optimal_block_length(x)
    # For AR(1): G/g = 2ρ/(1 − ρ²), so b_SB = (G/g)^(2/3) n^(1/3), n = chains · draws.
    theory = (2 * rho / (1 - rho**2)) ** (2 / 3) * (chains * draws) ** (1 / 3)
    np.testing.assert_allclose(b_sb, theory, rtol=0.25)
    np.testing.assert_allclose(b_cb / b_sb, 1.5 ** (1 / 3), rtol=1e-12)
    white_sb, _ = optimal_block_length(rng.standard_normal((4, 500, 50)))
    assert np.median(white_sb) < 2.0
    slow_sb, _ = optimal_block_length(ar1(rng, (4, 500, 50), 0.9))
    assert np.median(slow_sb) > 3 * np.median(white_sb)
    assert optimal_block_length(np.ones((2, 50)))[0] == 1.0
    # estimate() uses the median over entries of the product series' values.
    phi, delta = random_draws(seed=10)
    ds = estimate({"phi": phi, "delta_loss": delta}, method="stationary_bootstrap")
    expected = np.median(optimal_block_length(product_series(phi, delta))[0])
    assert float(ds["block_length"]) == pytest.approx(expected, rel=1e-12)


def test_interval_formulas_and_convergence_columns():
    phi, delta = random_draws(seed=11)
    n = phi.size
    series = product_series(phi, delta)
    summary = convergence.summary(series)
    ess = estimate({"phi": phi, "delta_loss": delta}, method="ess", confidence=0.9)
    sd = series.reshape(n, -1).std(axis=0, ddof=1) * n / (n - 1)
    np.testing.assert_allclose(ess["se"].values, sd / np.sqrt(summary["ess_bulk"]), rtol=1e-12)
    z = special.ndtri(0.95)
    np.testing.assert_allclose(ess["ci_high"] - ess["chi"], z * ess["se"], rtol=1e-12)
    p = 2 * stats.norm.sf(np.abs(ess["chi"].values) / ess["se"].values)
    np.testing.assert_allclose(ess["p_value"].values, p, rtol=1e-10)
    for key in ("rhat", "ess_bulk", "ess_tail"):
        np.testing.assert_allclose(ess[key].values, summary[key], rtol=1e-12)
    np.testing.assert_allclose(ess["mcse"].values, summary["mcse_mean"] * n / (n - 1))
    # Batch means: 4 chains × 200 draws, batches of 28 = ⌊√800⌋ (7 per chain, first 4
    # draws of each chain dropped), t interval and t p-value with 27 degrees of freedom.
    bm = estimate({"phi": phi, "delta_loss": delta}, method="batch_means")
    assert float(bm["block_length"]) == 28.0 and bm.attrs["num_batches"] == 28
    batch = series[:, 4:].reshape(4, 7, 28, -1).mean(axis=2).reshape(28, -1) * -n / (n - 1)
    np.testing.assert_allclose(bm["se"].values, batch.std(axis=0, ddof=1) / math.sqrt(28))
    tq = stats.t.ppf(0.975, 27)
    np.testing.assert_allclose(bm["ci_low"], bm["chi"] - tq * bm["se"], rtol=1e-12)
    tp = 2 * stats.t.sf(np.abs(bm["chi"].values) / bm["se"].values, 27)
    np.testing.assert_allclose(bm["p_value"].values, tp, rtol=1e-10)
    # Bootstrap: percentile interval brackets χ̂, SE > 0, p in [0, 1].
    sb = estimate({"phi": phi, "delta_loss": delta}, method="stationary_bootstrap", n_resamples=200)
    assert np.all(sb["ci_low"] < sb["chi"]) and np.all(sb["chi"] < sb["ci_high"])
    assert np.all((sb["p_value"] >= 0) & (sb["p_value"] <= 1)) and np.all(sb["se"] > 0)
    assert sb.attrs["method"] == "stationary_bootstrap" and sb.attrs["confidence"] == 0.95
    # Default (ess_t): SE = MCSE of the product series' mean, t interval and t p-value
    # with ν = ESS_mean / (kurtosis − 1) degrees of freedom (at least 2).
    et = estimate({"phi": phi, "delta_loss": delta})
    assert et.attrs["method"] == "ess_t"
    np.testing.assert_allclose(et["se"].values, et["mcse"].values, rtol=1e-12)
    dev = series.reshape(n, -1) - series.reshape(n, -1).mean(axis=0)
    kurt = (dev**4).mean(axis=0) / (dev**2).mean(axis=0) ** 2
    nu = np.maximum(convergence.ess_mean(series) / (kurt - 1), 2.0)
    tq = stats.t.ppf(0.975, nu)
    np.testing.assert_allclose(et["ci_high"] - et["chi"], tq * et["se"], rtol=1e-10)
    tp = 2 * stats.t.sf(np.abs(et["chi"].values) / et["se"].values, nu)
    np.testing.assert_allclose(et["p_value"].values, tp, rtol=1e-10)


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"confidence": 0.0}, "confidence"),
        ({"confidence": 1.0}, "confidence"),
        ({"confidence": 1.5}, "confidence"),
        ({"n_resamples": 0}, "n_resamples"),
        ({"method": "jackknife"}, "method"),
        ({"block_length": 0.5}, "block_length"),
        ({"block_length": 1000.0}, "block_length"),
        ({"groups": "dataset"}, "groups"),
        ({"groups": {"x": []}}, "groups"),
        ({"groups": {"x": [0, 99]}}, "groups"),
        ({"groups": ["a", "b"]}, "groups"),
        ({"renormalized_from": np.zeros(3)}, "renormalized_from"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, pattern):
    phi, delta = random_draws(seed=12, chains=2, draws=200, probes=5)
    with pytest.raises(ValueError, match=pattern):
        estimate({"phi": phi, "delta_loss": delta}, **kwargs)


def test_bad_data_raise():
    phi, delta = random_draws(seed=13, probes=5)
    with pytest.raises(ValueError, match="must match"):
        estimate({"phi": phi[:, :100], "delta_loss": delta})
    with pytest.raises(ValueError, match="chain, draw, probe"):
        estimate({"phi": phi, "delta_loss": delta[..., 0]})
    with pytest.raises(ValueError, match="fewer than two finite draws"):
        estimate({"phi": phi[:1, :1], "delta_loss": delta[:1, :1]})
    with pytest.raises(ValueError, match="block_length"):  # one chain, one batch
        estimate({"phi": phi[:1], "delta_loss": delta[:1]}, method="batch_means", block_length=150)
    with pytest.raises(ValueError, match="delta_loss"):
        estimate({"phi": phi})
    with pytest.raises(ValueError, match="posterior lacks"):
        estimate(xr.Dataset({"phi": (("chain", "draw"), phi)}))
    with pytest.raises(TypeError, match="data must be"):
        estimate(42)
    uneven = {
        "a": {"phi": phi, "delta_loss": delta},
        "b": {"phi": phi[:, :100], "delta_loss": delta[:, :100]},
    }
    with pytest.raises(ValueError, match="same shape"):
        estimate_many(uneven, method="stationary_bootstrap")
    # The ESS intervals treat each run on its own: runs of different lengths (extended
    # to a convergence target) give each component exactly its own estimate.
    both = estimate_many(uneven)
    for name, data in uneven.items():
        alone = estimate(data)
        for key in ("chi", "ci_low", "ci_high", "rhat"):
            np.testing.assert_array_equal(both[key].sel(component=name), alone[key])
    assert both["num_draws"].values.tolist() == [phi.size, phi[:, :100].size]
    with pytest.raises(ValueError, match="probe items"):
        estimate_many(
            {
                "a": {"phi": phi, "delta_loss": delta},
                "b": {"phi": phi, "delta_loss": delta[..., :3]},
            }
        )
    with pytest.raises(ValueError, match="runs must be"):
        estimate_many({})
    with pytest.raises(ValueError, match="phi"):
        pooled_chi(phi[0], delta)
    with pytest.raises(ValueError, match="weights"):
        resampled_chi(phi, delta, np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="block_length"):
        resample_weights("stationary_bootstrap", 2, 10)


# ------------------------------------------------------------------------ performance


@pytest.mark.slow
def test_speed_of_joint_bootstrap():
    """16 components × 10,000 probes × 1,000 stationary-bootstrap resamples, 4 × 200 draws.

    Measured on this 2-core box (float64, nothing else running): the resampling itself
    (weights, matrix products, sd, percentiles) 2.9 s; the whole estimate_many 16.3 s,
    of which ≈ 13 s is the per-entry convergence.summary (R-hat, bulk/tail ESS, MCSE of
    1.6·10⁵ product series). With other jobs sharing the cores: ≈ 8–13 s and 25–35 s.
    """
    rng = np.random.default_rng(0)
    runs = {}
    for k in range(16):
        phi = rng.standard_normal((4, 200))
        runs[f"c{k}"] = {
            "phi": phi,
            "delta_loss": rng.standard_normal((4, 200, 10_000)) + 0.1 * phi[..., None],
        }
    start = time.perf_counter()
    ds = estimate_many(runs, n_resamples=1000)
    elapsed = time.perf_counter() - start
    print(f"estimate_many 16 x 10,000 x 1,000 resamples: {elapsed:.1f} s")
    assert ds["chi"].shape == (10_000, 16) and np.all(np.isfinite(ds["se"]))
    assert elapsed < 120

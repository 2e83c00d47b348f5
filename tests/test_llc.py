"""The restricted local learning coefficient λ̂ = nβ·mean(φ) against its closed form on the
linear–Gaussian model (DESIGN.md §5): with the whole training set as the eval set the
gradient at w* vanishes and E[φ] = ½·tr(H S), S the chain's stationary covariance."""

from __future__ import annotations

import numpy as np
import pytest

from bayes_susc.checks.ground_truth import (
    LinearGaussianProblem,
    sgld_stationary_cov,
    simulate_sgld,
    torch_local_posterior,
)
from bayes_susc.estimation.llc import local_learning_coefficient

EPS = 1e-3


@pytest.fixture(scope="module")
def problem() -> LinearGaussianProblem:
    return LinearGaussianProblem.make(n_eval=None, free=[0, 2, 5], seed=1)


def _closed_form(problem: LinearGaussianProblem) -> float:
    H, g = problem.phi_terms()
    assert np.abs(g).max() < 1e-10  # w* minimizes the training loss: no linear term
    return problem.nbeta * 0.5 * float(np.trace(H @ sgld_stationary_cov(problem.K, EPS)))


def test_llc_matches_its_closed_form_within_mc_error(problem):
    rng = np.random.default_rng(3)
    phi, _ = simulate_sgld(problem, EPS, (4,), 4000, 1, rng)
    got = local_learning_coefficient({"phi": phi}, nbeta=problem.nbeta)
    exact = _closed_form(problem)
    assert abs(float(got["llc"]) - exact) < 4 * float(got["se"])
    assert float(got["se"]) < 0.05 * exact  # a real measurement, not a wide interval
    assert int(got["num_draws"]) == 16_000


def test_llc_intervals_cover_and_their_se_is_calibrated(problem):
    """200 independent runs of 4 × 400 draws: the spread of λ̂ over runs matches the
    mean reported SE within 20 %, and the 95 % intervals cover the closed form in 88–99 %
    of runs (binomial sd ≈ 1.5 %)."""
    rng = np.random.default_rng(4)
    phi, _ = simulate_sgld(problem, EPS, (200, 4), 400, 1, rng)
    exact = _closed_form(problem)
    runs = [local_learning_coefficient({"phi": p}, nbeta=problem.nbeta) for p in phi]
    llc = np.array([float(r["llc"]) for r in runs])
    se = np.array([float(r["se"]) for r in runs])
    assert 0.8 < llc.std(ddof=1) / se.mean() < 1.2
    covered = [float(r["ci_low"]) <= exact <= float(r["ci_high"]) for r in runs]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_llc_reads_nbeta_from_a_sampling_run_and_skips_diverged_chains(problem):
    from bayes_susc import sample
    from bayes_susc.storage.draws import get_group

    post, eval_data, probe_data = torch_local_posterior(problem)
    data = sample(
        post,
        "sgld",
        eval_data=eval_data,
        probe_data=probe_data,
        num_chains=2,
        num_draws=50,
        step_size=EPS,
        seed=0,
        progress=False,
    )
    phi = get_group(data, "posterior")["phi"].values
    got = local_learning_coefficient(data)
    assert got.attrs["nbeta"] == problem.nbeta
    assert float(got["llc"]) == pytest.approx(problem.nbeta * phi.mean(), rel=1e-12)
    broken = phi.copy()
    broken[1, 10:] = np.nan  # a diverged chain is left out, as estimate() does
    kept = local_learning_coefficient({"phi": broken}, nbeta=problem.nbeta)
    assert float(kept["llc"]) == pytest.approx(problem.nbeta * phi[0].mean(), rel=1e-12)
    assert int(kept["num_draws"]) == 50


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="nbeta"):
        local_learning_coefficient({"phi": np.zeros((2, 5))})
    with pytest.raises(ValueError, match="nbeta"):
        local_learning_coefficient({"phi": np.zeros((2, 5))}, nbeta=-1.0)
    with pytest.raises(ValueError, match="confidence"):
        local_learning_coefficient({"phi": np.zeros((2, 5))}, nbeta=1.0, confidence=1.5)
    with pytest.raises(ValueError, match="shape"):
        local_learning_coefficient({"phi": np.zeros(5)}, nbeta=1.0)

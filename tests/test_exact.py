"""Exact samplers for auditing: NUTS and MALA columns against the closed-form posterior χ."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bayes_susc import get_group, sample
from bayes_susc.checks.ground_truth import LinearGaussianProblem, torch_local_posterior
from bayes_susc.estimation.susceptibility import estimate
from bayes_susc.sampling.exact import sample_nuts


@pytest.fixture(scope="module")
def problem() -> LinearGaussianProblem:
    return LinearGaussianProblem.make(p=6, free=[0, 2, 5], n_eval=100, n_probe=8, seed=7)


def test_nuts_column_matches_the_posterior_chi(problem):
    posterior, eval_data, probe_data = torch_local_posterior(problem)
    data = sample_nuts(
        posterior,
        eval_data=eval_data,
        probe_data=probe_data,
        num_chains=4,
        num_draws=400,
        num_warmup=200,
        seed=1,
        progress=False,
    )
    post = get_group(data, "posterior")
    assert post["probe_loss"].shape == (4, 400, problem.X_probe.shape[0])
    stats = get_group(data, "sample_stats")
    assert not stats["diverged"].values.any()
    assert post.attrs["num_divergent_transitions"] == int(stats["divergent_transition"].sum())
    config = json.loads(post.attrs["bayes_susc_config"])
    assert config["kernel"] == "nuts" and config["num_draws"] == 400
    est = estimate(data)
    exact = problem.chi_posterior()  # NUTS has no step-size bias
    assert np.all(np.abs(est["chi"].values - exact) < 4 * est["se"].values)
    # φ is the eval-loss increase: its posterior mean is the closed form.
    H, _ = problem.phi_terms()
    mean_phi = 0.5 * np.trace(H @ problem.posterior_cov)
    se_phi = post["phi"].values.std() / np.sqrt(est["ess_bulk"].values.min())
    assert abs(post["phi"].values.mean() - mean_phi) < 5 * se_phi


def test_mala_column_matches_the_posterior_chi(problem):
    posterior, eval_data, probe_data = torch_local_posterior(problem)
    lam_max = np.linalg.eigvalsh(problem.K).max()
    data = sample(
        posterior,
        "mala",
        step_size=1.0 / lam_max,
        eval_data=eval_data,
        probe_data=probe_data,
        num_chains=8,
        num_draws=1000,
        num_burnin=100,
        steps_per_draw=2,
        seed=2,
        progress=False,
    )
    est = estimate(data)
    exact = problem.chi_posterior()
    assert np.all(np.abs(est["chi"].values - exact) < 4 * est["se"].values)
    acceptance = get_group(data, "sample_stats")["acceptance_rate"].values.mean()
    assert 0.5 < acceptance < 1.0


def test_nuts_bad_input(problem):
    posterior, eval_data, probe_data = torch_local_posterior(problem)
    with pytest.raises(ValueError, match="target_accept_prob"):
        sample_nuts(posterior, eval_data=eval_data, probe_data=probe_data, target_accept_prob=1.5)
    with pytest.raises(ValueError, match="num_draws"):
        sample_nuts(posterior, eval_data=eval_data, probe_data=probe_data, num_draws=0)
    with pytest.raises(TypeError, match="LocalPosterior"):
        sample_nuts(object(), eval_data=eval_data, probe_data=probe_data)

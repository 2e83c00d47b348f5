"""Checks of the linear–Gaussian closed forms against Monte Carlo, direct simulation of the
sampler recursions, finite differences and direct evaluation of the losses."""

from __future__ import annotations

import numpy as np
import pytest

from bayes_susc.checks.ground_truth import (
    LinearGaussianProblem,
    preconditioned_sgld_stationary_cov,
    quad_cov,
    quad_mean,
    sghmc_stationary_cov,
    sgld_stationary_cov,
    simulate_sgld,
)


@pytest.fixture(scope="module")
def problem() -> LinearGaussianProblem:
    return LinearGaussianProblem.make(free=[0, 2, 5], seed=1)


def _random_spd(rng: np.random.Generator, s: int) -> np.ndarray:
    M = rng.standard_normal((s, s))
    return M @ M.T / s + 0.5 * np.eye(s)


def _random_sym(rng: np.random.Generator, s: int) -> np.ndarray:
    M = rng.standard_normal((s, s))
    return M + M.T


def _assert_second_moments(z: np.ndarray, target: np.ndarray, n_se: float = 4.0) -> np.ndarray:
    """Compare E[z zᵀ] of i.i.d. mean-zero rows z (N, d) with ``target``; return the SEs."""
    prods = z[:, :, None] * z[:, None, :]
    est = prods.mean(axis=0)
    se = prods.std(axis=0, ddof=1) / np.sqrt(len(z))
    assert np.all(np.abs(est - target) < n_se * se), (est, target, se)
    return se


def test_quad_moments_match_monte_carlo():
    rng = np.random.default_rng(0)
    s, N = 4, 400_000
    C = _random_spd(rng, s)
    A, B = _random_sym(rng, s), _random_sym(rng, s)
    a, b = rng.standard_normal(s), rng.standard_normal(s)
    d = rng.standard_normal((N, s)) @ np.linalg.cholesky(C).T
    f = 0.5 * np.einsum("na,ab,nb->n", d, A, d) + d @ a
    g = 0.5 * np.einsum("na,ab,nb->n", d, B, d) + d @ b

    se_mean = f.std(ddof=1) / np.sqrt(N)
    assert abs(f.mean() - quad_mean(A, C)) < 4 * se_mean
    prod = (f - f.mean()) * (g - g.mean())
    assert abs(prod.mean() - quad_cov(A, a, B, b, C)) < 4 * prod.std(ddof=1) / np.sqrt(N)
    # The identity is symmetric and reduces to a variance.
    assert quad_cov(A, a, B, b, C) == pytest.approx(quad_cov(B, b, A, a, C), rel=1e-12)
    assert quad_cov(A, a, A, a, C) > 0


def test_quadratic_expansions_are_exact():
    """φ, ℓ_i and ∇U as the problem's quadratic forms agree with the losses themselves."""
    pr = LinearGaussianProblem.make(free=[1, 3, 4], seed=2)
    rng = np.random.default_rng(3)
    H, g = pr.phi_terms()
    P, lin = pr.probe_terms()
    L_E_star, l_star = pr.loss_at_star()
    n = len(pr.X_train)
    for _ in range(5):
        d = rng.standard_normal(pr.dim)
        w = pr.w_star.copy()
        w[pr.free] += d
        L_E = 0.5 * np.mean((pr.y_eval - pr.X_eval @ w) ** 2)
        losses = 0.5 * (pr.y_probe - pr.X_probe @ w) ** 2
        assert L_E - L_E_star == pytest.approx(0.5 * d @ H @ d + g @ d, rel=1e-10)
        expected = 0.5 * np.einsum("a,mab,b->m", d, P, d) + lin @ d
        np.testing.assert_allclose(losses - l_star, expected, rtol=1e-10, atol=1e-12)
        grad_U = -pr.nbeta * pr.X_train[:, pr.free].T @ (pr.y_train - pr.X_train @ w) / n
        np.testing.assert_allclose(grad_U + pr.gamma * d, pr.K @ d, rtol=1e-10)
    assert np.linalg.norm(g) > 1e-3  # E is not the training set, so φ has a linear part
    np.testing.assert_allclose(pr.posterior_cov @ pr.K, np.eye(pr.dim), atol=1e-12)


def test_chi_matches_per_item_quad_cov_and_observable_moments(problem):
    H, g = problem.phi_terms()
    P, lin = problem.probe_terms()
    for cov in (problem.posterior_cov, sgld_stationary_cov(problem.K, 5e-3)):
        chi = problem.chi(cov)
        loop = [-quad_cov(H, g, P[i] - H, lin[i] - g, cov) for i in range(len(P))]
        np.testing.assert_allclose(chi, loop, rtol=1e-10)
        # Cov(φ, L_E) = Var φ because L_E − φ is a constant.
        mean, c = problem.mean_and_cov_of_observables(cov)
        np.testing.assert_allclose(chi, -(c[0, 1:] - c[0, 0]), rtol=1e-10)
        assert mean[0] == pytest.approx(problem.mean_phi(cov), rel=1e-12)
        assert np.all(np.linalg.eigvalsh(c) > -1e-15)
    assert np.all(np.abs(problem.chi_posterior()) > 1e-7)


def test_sgld_closed_form_equals_lyapunov(problem):
    for eps in (1e-4, 1e-3, 9e-3):
        closed = sgld_stationary_cov(problem.K, eps)
        lyap = sgld_stationary_cov(problem.K, eps, method="lyapunov")
        np.testing.assert_allclose(closed, lyap, rtol=0, atol=1e-10 * np.abs(closed).max())
        np.testing.assert_allclose(closed, lyap, rtol=1e-10)


def test_sgld_simulation_matches_stationary_not_posterior(problem):
    eps, n_chains, n_steps = 8e-3, 20_000, 300
    K = problem.K
    rng = np.random.default_rng(4)
    d = np.zeros((n_chains, problem.dim))
    for _ in range(n_steps):
        d = d - 0.5 * eps * d @ K + np.sqrt(eps) * rng.standard_normal(d.shape)
    S = sgld_stationary_cov(K, eps)
    se = _assert_second_moments(d, S)
    # At this step size the chain's law is far from the posterior.
    assert np.all(np.abs(np.diag(S - problem.posterior_cov)) > 20 * np.diag(se))


def test_simulation_from_w_star_has_the_transient_law(problem):
    """Started at w* with 2 burn-in steps, the first kept draw (after 3 steps) has
    covariance Σ_{j<3} Aʲ(εI)Aʲᵀ, A = I − εK/2 (the recursion written out), so
    E[φ] = ½tr(H·that): checked within 4 SE over 40,000 chains, and far from the
    stationary ½tr(H S), which a stationary start gives."""
    eps = 1e-3
    K, H = problem.K, problem.phi_terms()[0]
    A = np.eye(problem.dim) - 0.5 * eps * K
    transient = sum(
        eps * np.linalg.matrix_power(A, j) @ np.linalg.matrix_power(A, j).T for j in range(3)
    )
    rng = np.random.default_rng(8)
    phi, _ = simulate_sgld(problem, eps, (40_000,), 2, 1, rng, num_burnin=2)
    first = phi[:, 0]
    se = first.std(ddof=1) / np.sqrt(first.size)
    assert abs(first.mean() - 0.5 * np.trace(H @ transient)) < 4 * se
    stationary = 0.5 * np.trace(H @ sgld_stationary_cov(K, eps))
    assert stationary - first.mean() > 20 * se
    phi_s, _ = simulate_sgld(problem, eps, (40_000,), 2, 1, rng)
    assert abs(phi_s[:, 0].mean() - stationary) < 4 * phi_s[:, 0].std() / np.sqrt(40_000)


def test_sghmc_simulation_matches_stationary(problem):
    eps, alpha, n_chains, n_steps = 3e-2, 20.0, 20_000, 400
    K, s = problem.K, problem.dim
    rng = np.random.default_rng(5)
    d, p = np.zeros((n_chains, s)), np.zeros((n_chains, s))
    for _ in range(n_steps):
        d = d + eps * p
        noise = np.sqrt(2 * alpha * eps) * rng.standard_normal(p.shape)
        p = (1 - eps * alpha) * p - eps * d @ K + noise
    full = sghmc_stationary_cov(K, eps, alpha, full=True)
    np.testing.assert_array_equal(full[:s, :s], sghmc_stationary_cov(K, eps, alpha))
    se = _assert_second_moments(np.hstack([d, p]), full)
    assert np.all(np.abs(np.diag(full[:s, :s] - problem.posterior_cov)) > 8 * np.diag(se)[:s])
    # As ε → 0 SGHMC samples the posterior (δ) and a unit-variance momentum.
    small = sghmc_stationary_cov(K, 1e-5, alpha, full=True)
    np.testing.assert_allclose(small[:s, :s], problem.posterior_cov, rtol=1e-3)
    np.testing.assert_allclose(small[s:, s:], np.eye(s), atol=1e-3)


def test_preconditioned_sgld(problem):
    K, s, eps = problem.K, problem.dim, 4e-3
    # A constant preconditioner c is SGLD with step size cε.
    for c in (1.0, 0.5):
        np.testing.assert_allclose(
            preconditioned_sgld_stationary_cov(K, eps, np.full(s, c)),
            sgld_stationary_cov(K, c * eps),
            rtol=1e-10,
        )
    G = np.array([0.5, 1.0, 2.0])
    rng = np.random.default_rng(6)
    d = np.zeros((20_000, s))
    for _ in range(400):
        d = d - 0.5 * eps * (d @ K) * G + np.sqrt(eps * G) * rng.standard_normal(d.shape)
    P = preconditioned_sgld_stationary_cov(K, eps, G)
    _assert_second_moments(d, P)
    np.testing.assert_allclose(
        preconditioned_sgld_stationary_cov(K, 1e-7, G), problem.posterior_cov, rtol=1e-4
    )


@pytest.mark.parametrize("i", [0, 3, 5, 7])
def test_lemma_finite_difference_equals_chi(i):
    pr = LinearGaussianProblem.make(n_eval=None, free=[0, 2, 5], seed=1)
    h = 1e-5
    fd = (pr.perturbed_mean_phi(i, h) - pr.perturbed_mean_phi(i, -h)) / (2 * h)
    assert pr.perturbed_mean_phi(i, 0.0) == pytest.approx(pr.mean_phi(pr.posterior_cov))
    assert fd / pr.nbeta == pytest.approx(pr.chi_posterior()[i], rel=1e-6)


def test_lemma_with_separate_eval_set(problem):
    """The response of ⟨φ⟩ is −nβ·Cov(φ, ℓ_i − L_n) for any E; with E ≠ train it also
    exercises the mean shift μ_h through φ's linear term."""
    H, g = problem.phi_terms()
    P, lin = problem.probe_terms()
    XS = problem.X_train[:, problem.free]
    H_n = XS.T @ XS / len(XS)
    zero = np.zeros(problem.dim)
    h = 1e-5
    for i in (1, 4):
        fd = (problem.perturbed_mean_phi(i, h) - problem.perturbed_mean_phi(i, -h)) / (2 * h)
        target = -quad_cov(H, g, P[i] - H_n, lin[i] - zero, problem.posterior_cov)
        assert fd / problem.nbeta == pytest.approx(target, rel=1e-6)


def test_chi_sgld_converges_to_posterior_at_first_order(problem):
    H, g = problem.phi_terms()
    Sigma = problem.posterior_cov
    w = np.linalg.lstsq(problem.X_train, problem.y_train, rcond=None)[0]
    x = problem.X_probe[:, problem.free]
    e = problem.y_probe - problem.X_probe @ w
    # S = Σ + (ε/4)I + O(ε²), so with ℓ_i − L_E = ½δᵀA_iδ + a_iᵀδ + const,
    # dχ_i/dε at 0 = −¼[tr(H_E A_i Σ) + g_Eᵀ a_i].
    A = x[:, :, None] * x[:, None, :] - H
    a = -e[:, None] * x - g
    slope = -0.25 * (np.einsum("ab,mbc,ca->m", H, A, Sigma) + a @ g)
    chi_post = problem.chi_posterior()
    errs = []
    for eps in (1e-3, 5e-4, 2.5e-4, 1.25e-4):
        errs.append(np.abs((problem.chi_sgld(eps) - chi_post) / eps - slope).max())
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    np.testing.assert_allclose(ratios, 2.0, rtol=0.1)  # the remainder is O(ε)
    assert errs[-1] < 0.02 * np.abs(slope).max()
    np.testing.assert_allclose(problem.chi_sgld(1e-8), chi_post, rtol=1e-5)


def test_unstable_step_sizes_raise(problem):
    K, s = problem.K, problem.dim
    lam_max = np.linalg.eigvalsh(K)[-1]
    eps = 4.01 / lam_max
    with pytest.raises(ValueError, match="step_size"):
        sgld_stationary_cov(K, eps)
    with pytest.raises(ValueError, match="step_size"):
        sgld_stationary_cov(K, eps, method="lyapunov")
    with pytest.raises(ValueError, match="step_size"):
        problem.chi_sgld(eps)
    with pytest.raises(ValueError, match="step_size"):
        preconditioned_sgld_stationary_cov(K, eps / 2, np.full(s, 2.01))
    with pytest.raises(ValueError, match="friction"):
        sghmc_stationary_cov(K, 5e-2, 36.0)
    with pytest.raises(ValueError, match="step_size"):
        sgld_stationary_cov(K, -1e-3)
    sgld_stationary_cov(K, 3.99 / lam_max)  # just inside the boundary is fine


def test_problem_validation_and_reproducibility():
    a = LinearGaussianProblem.make(seed=7)
    b = LinearGaussianProblem.make(seed=7)
    np.testing.assert_array_equal(a.w_star, b.w_star)
    np.testing.assert_array_equal(a.free, np.arange(6))
    with pytest.raises(ValueError, match="free"):
        LinearGaussianProblem.make(free=[2, 1])
    with pytest.raises(ValueError, match="free"):
        LinearGaussianProblem.make(p=4, free=[0, 4])
    with pytest.raises(ValueError):
        a.X_train[0, 0] = 1.0  # arrays are read-only so cached properties stay valid

"""Every kernel samples the linear–Gaussian local posterior correctly (DESIGN.md §2, §5).

The target: ℓ_i(w) = ½(y_i − x_iᵀw)², a *restricted* component S (3 of the 5 weights,
selected by a bool mask), nβ = 100 and γ = 100 (not the literature defaults: they make K
anisotropic, condition number ≈ 5, so the off-diagonal entries are tested too), full batch.
Then δ = v − v* is exactly N(0, Σ) with Σ = K⁻¹, K = nβ·H_S + γI, and the linear kernels
have exact stationary laws of their own (``ground_truth``).

Each test runs the real driver (``bayes_susc.sample``), records the whole weight vector with
a user observable, checks that the frozen weights never move, and compares the sample mean
and covariance of δ with the exact law. Tolerance: |estimate − exact| < 4 MCSE for each of
the 3 means and 6 covariance entries (STYLE.md: 4 rather than 3 with many entries; the
chance that one of 9 honest z-scores exceeds 4 is < 1e-3). The MCSE is ESS-aware:
``arviz.mcse`` on the (chain, draw) array of each coordinate and of each centred product
(through ``tests/arviz_reference.py``: ArviZ 0.x or 1.x).
Where a kernel's law is known to differ from Σ, the test also asserts that the estimate is
*incompatible* with Σ, so the comparison discriminates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arviz_reference import mcse_mean

import bayes_susc
from bayes_susc.checks.ground_truth import (
    LinearGaussianProblem,
    preconditioned_sgld_stationary_cov,
    sghmc_stationary_cov,
    sgld_stationary_cov,
    torch_local_posterior,
)
from bayes_susc.target.posterior import LocalPosterior

N_SE = 4.0  # MCSEs allowed per entry (9 entries per law)
FAR = 8.0  # |z| that counts as "incompatible"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These chains are tiny vmapped ops: extra OpenMP threads only add overhead, and on a
    busy 2-core machine they make every step ~20× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.array(a), dtype=torch.float64)


@pytest.fixture(scope="module")
def problem() -> LinearGaussianProblem:
    """p = 5 correlated columns (so freezing u matters: the restricted posterior of S is
    not the S-marginal of the unrestricted one), S = {0, 2, 3}."""
    rng = np.random.default_rng(0)
    p = 5
    mixing = np.eye(p) + 0.6 * rng.standard_normal((p, p))
    scales = np.geomspace(0.5, 2.0, p)
    w_true = rng.standard_normal(p)

    def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
        X = (rng.standard_normal((k, p)) @ mixing) * scales
        return X, X @ w_true + 0.5 * rng.standard_normal(k)

    (X, y), (X_e, y_e), (X_p, y_p) = draw(200), draw(50), draw(4)
    return LinearGaussianProblem(X, y, X_e, y_e, X_p, y_p, np.array([0, 2, 3]), 100.0, 100.0)


@pytest.fixture(scope="module")
def posterior(problem: LinearGaussianProblem) -> LocalPosterior:
    return torch_local_posterior(problem)[0]


def _lambda_max(problem: LinearGaussianProblem) -> float:
    return float(np.linalg.eigvalsh(problem.K)[-1])


def _draws(
    posterior: LocalPosterior, problem: LinearGaussianProblem, kernel: str, **kwargs
) -> tuple[np.ndarray, object]:
    """δ = v − v* at every draw, shape (chain, draw, s), and the InferenceData.

    Also checks that the frozen weights are bit-identical to w* at every draw."""
    idata = bayes_susc.sample(
        posterior,
        kernel,
        eval_data=(_as_tensor(problem.X_eval), _as_tensor(problem.y_eval)),
        probe_data=(_as_tensor(problem.X_probe), _as_tensor(problem.y_probe)),
        observables={"w": lambda m: m.weight[0]},
        progress=False,
        **kwargs,
    )
    w = idata.posterior["w"].values
    assert np.isfinite(w).all()
    frozen = np.setdiff1d(np.arange(w.shape[-1]), problem.free)
    assert (w[..., frozen] == problem.w_star[frozen]).all(), "a frozen weight moved"
    return w[..., problem.free] - problem.w_star[problem.free], idata


def _moments(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean (s,), its MCSE, covariance (s, s), its MCSE; ESS-aware (arviz.mcse per series)."""
    s = delta.shape[-1]
    mean = delta.mean(axis=(0, 1))
    mean_se = np.array([mcse_mean(delta[..., a]) for a in range(s)])
    centred = delta - mean
    cov, cov_se = np.empty((s, s)), np.empty((s, s))
    for a in range(s):
        for b in range(a, s):
            prod = centred[..., a] * centred[..., b]
            cov[a, b] = cov[b, a] = prod.mean()
            cov_se[a, b] = cov_se[b, a] = mcse_mean(prod)
    return mean, mean_se, cov, cov_se


def _z_scores(delta: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z of the 3 means against 0 and of the 6 covariance entries against ``cov``."""
    mean, mean_se, est, est_se = _moments(delta)
    upper = np.triu_indices(len(cov))
    return mean / mean_se, ((est - cov) / est_se)[upper]


def _assert_law(delta: np.ndarray, cov: np.ndarray) -> None:
    z_mean, z_cov = _z_scores(delta, cov)
    assert np.all(np.abs(z_mean) < N_SE), f"mean of δ is not 0: z = {z_mean}"
    assert np.all(np.abs(z_cov) < N_SE), f"covariance of δ is off: z = {z_cov}"


def _assert_not_law(delta: np.ndarray, cov: np.ndarray, what: str) -> None:
    _, z_cov = _z_scores(delta, cov)
    assert np.max(np.abs(z_cov)) > FAR, f"the draws cannot tell their law from {what}: z = {z_cov}"


def test_sgld_samples_its_exact_stationary_law(problem, posterior):
    """At ε·λmax(K) = 1.6 SGLD's law S = (K − εK²/4)⁻¹ is 1.1–1.6 × Σ on the diagonal:
    the draws must match S and be incompatible with Σ (observed max |z| vs Σ ≈ 20)."""
    eps = 1.6 / _lambda_max(problem)
    delta, _ = _draws(
        posterior, problem, "sgld", step_size=eps,
        num_chains=16, num_draws=400, num_burnin=100, steps_per_draw=5, seed=1,
    )  # fmt: skip
    _assert_law(delta, sgld_stationary_cov(problem.K, eps))
    _assert_not_law(delta, problem.posterior_cov, "Σ")


def test_sghmc_samples_its_exact_stationary_law(problem, posterior):
    """SGHMC at ε = 0.03, friction 30: its Lyapunov law is 1.05–1.25 × Σ on the diagonal
    (observed max |z| vs Σ ≈ 11)."""
    eps, friction = 0.03, 30.0
    delta, _ = _draws(
        posterior, problem, "sghmc", step_size=eps, friction=friction,
        num_chains=16, num_draws=400, num_burnin=200, steps_per_draw=5, seed=2,
    )  # fmt: skip
    _assert_law(delta, sghmc_stationary_cov(problem.K, eps, friction))
    _assert_not_law(delta, problem.posterior_cov, "Σ")


def test_mala_samples_the_restricted_posterior_exactly(problem, posterior):
    """MALA has no step-size bias: at the same ε where SGLD is visibly off, it matches Σ,
    and is incompatible both with SGLD's law (observed |z| ≈ 33) and with the S-marginal
    of the *unrestricted* posterior (|z| ≈ 22), which is what one would get if the frozen
    weights were sampled too."""
    eps = 1.6 / _lambda_max(problem)
    delta, idata = _draws(
        posterior, problem, "mala", step_size=eps,
        num_chains=16, num_draws=400, num_burnin=100, steps_per_draw=5, seed=3,
    )  # fmt: skip
    _assert_law(delta, problem.posterior_cov)
    # Healthy acceptance: neither stuck nor a proposal so small that MH never acts.
    acceptance = float(idata.sample_stats["acceptance_rate"].mean())
    assert 0.5 < acceptance < 0.97, acceptance

    _assert_not_law(delta, sgld_stationary_cov(problem.K, eps), "SGLD's law at the same ε")
    X = problem.X_train
    K_all = problem.nbeta * X.T @ X / len(X) + problem.gamma * np.eye(X.shape[1])
    marginal = np.linalg.inv(K_all)[np.ix_(problem.free, problem.free)]
    _assert_not_law(delta, marginal, "the marginal of the unrestricted posterior")


def test_psgld_with_a_frozen_preconditioner_samples_its_exact_law(problem, posterior):
    """With α → 1 the RMSProp average V stays at its start value 1, so G = 1/(λ + 1) is a
    constant (here λ = eps = 1, G = ½) and pSGLD is the linear recursion
    δ' = (I − (ε/2)GK)δ + √(εG) ξ, whose law ``preconditioned_sgld_stationary_cov`` gives
    exactly. This pins down how G enters the drift (G) and the noise (√G)."""
    G = 0.5
    eps = 1.6 / (G * _lambda_max(problem))
    delta, idata = _draws(
        posterior, problem, "psgld", step_size=eps, alpha=1.0 - 1e-12, eps=1.0,
        num_chains=16, num_draws=400, num_burnin=100, steps_per_draw=5, seed=4,
    )  # fmt: skip
    np.testing.assert_allclose(idata.sample_stats["precond_mean"].values, G, rtol=1e-5)
    _assert_law(delta, preconditioned_sgld_stationary_cov(problem.K, eps, np.full(3, G)))
    _assert_not_law(delta, problem.posterior_cov, "Σ")


def test_psgld_adaptive_is_close_to_the_posterior(problem, posterior):
    """Adaptive pSGLD has no closed-form law. Its bias has two parts: discretisation
    (≈ εGλ/4) and the dropped Γ term (G follows |∇U| and so correlates with δ; full batch
    makes this strong). Measured once with 256 chains × 3000 kept steps against Σ:

        α = 0.99,  ε = 1e-2:  diagonal  +9% … +14%
        α = 0.99,  ε = 1e-3:  diagonal +29% … +46%   (worse as ε → 0)
        α = 0.999, ε = 3e-3:  diagonal +4.1%, +3.6%, +2.0%; off-diagonal ≤ 1.4%

    so the default α = 0.99 is far off on a full-batch target, and we test α = 0.999,
    ε = 3e-3, with ≈ 300–600 effective draws: MCSE ≈ 6–8% of each variance, the bias is
    ≤ 0.7 MCSE. This checks the adaptive kernel to ~25%, not more; the exact law of its
    update is pinned down by the frozen-preconditioner test above.

    It also checks the RMSProp average itself: at equilibrium V_a ≈ E[(∇U)_a²] = (KΣK)_aa,
    so G_a ≈ 1/√(KΣK)_aa = 1/√K_aa; the recorded mean of G matched this within 0.7% in
    the long runs and within 1.6% over 9 seeds of this test, so we allow 3%.
    """
    delta, idata = _draws(
        posterior, problem, "psgld", step_size=3e-3, alpha=0.999,
        num_chains=32, num_draws=200, num_burnin=4000, steps_per_draw=10, seed=5,
    )  # fmt: skip
    _assert_law(delta, problem.posterior_cov)
    expected_G = np.mean(1.0 / np.sqrt(np.diag(problem.K)))
    assert float(idata.sample_stats["precond_mean"].mean()) == pytest.approx(expected_G, rel=0.03)


def test_sgnht_at_small_step_samples_the_posterior(problem, posterior):
    """SGNHT has no closed-form law (ξ fluctuates). The discrete momentum update runs hot
    by ≈ 1/(1 − εξ/2); the thermostat targets (1 − εξ/2)·pᵀp/d = 1, that temperature,
    so ξ stays near A and the positions are SGHMC's at friction ≈ A (Ding et al.'s target
    pᵀp/d = 1 put ξ at ≈ A(1 + εA/2) and ran the positions cold by ≈ εA/2: −5.9 %,
    −6.3 %, −5.3 % (± 0.8 %) at ε = 5e-3, A = 20). Measured once through the driver
    (128 chains × 8000 kept steps after 2000) against Σ: ε = 5e-3, A = 20: −0.0 %,
    −0.4 %, +1.4 % (± 0.6–0.9 %), mean ξ = 0.998·A; this test's ε = 2e-3, A = 5: +0.1 %,
    −0.6 %, +1.3 % (± 1.2 %). The MCSE of each variance here is ≈ 3 %, so any bias is
    < 0.5 MCSE. ``tests/test_sgnht.py`` tests the thermostat itself."""
    delta, idata = _draws(
        posterior, problem, "sgnht", step_size=2e-3, diffusion=5.0,
        num_chains=64, num_draws=150, num_burnin=1000, steps_per_draw=20, seed=6,
    )  # fmt: skip
    _assert_law(delta, problem.posterior_cov)
    assert np.isfinite(idata.sample_stats["thermostat"].values).all()

"""Exact closed forms for the linear–Gaussian model (DESIGN.md §5), pure numpy/scipy.

With ℓ_i(w) = ½(y_i − x_iᵀw)² and δ = v − v* on the free coordinates S, every observable
is a quadratic in δ, so under any centered Gaussian law of δ (the local posterior, or the
stationary law of a linear sampler recursion) its moments are closed forms. Samplers and
susceptibility estimators are tested against these numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.linalg import solve_discrete_lyapunov


def quad_mean(A: np.ndarray, C: np.ndarray) -> float:
    """E[½δᵀAδ + aᵀδ] = ½ tr(AC) for δ ~ N(0, C) (any a); A, C are (s, s)."""
    return 0.5 * float(np.sum(A * C.T))


def quad_cov(A: np.ndarray, a: np.ndarray, B: np.ndarray, b: np.ndarray, C: np.ndarray) -> float:
    """Cov(½δᵀAδ + aᵀδ, ½δᵀBδ + bᵀδ) = ½ tr(ACBC) + aᵀCb for δ ~ N(0, C).

    A, B, C are symmetric (s, s); a, b are (s,). The cross term between the quadratic
    and linear parts vanishes because odd moments of a centered Gaussian are zero.
    """
    AC, BC = A @ C, B @ C
    return 0.5 * float(np.sum(AC * BC.T)) + float(a @ C @ b)


def _stationary_cov(A: np.ndarray, Q: np.ndarray, what: str) -> np.ndarray:
    """Stationary covariance P = A P Aᵀ + Q of z' = A z + noise(Q)."""
    rho = float(np.max(np.abs(np.linalg.eigvals(A))))
    if not rho < 1.0:
        raise ValueError(f"{what}: the recursion is unstable (spectral radius {rho:.6g} >= 1)")
    P = solve_discrete_lyapunov(A, Q)
    return 0.5 * (P + P.T)


def _check_step(step_size: float) -> float:
    step_size = float(step_size)
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return step_size


def sgld_stationary_cov(K: np.ndarray, step_size: float, method: str = "closed") -> np.ndarray:
    """Stationary covariance (s, s) of full-batch SGLD on U = ½δᵀKδ.

    Welling–Teh rule δ' = (I − εK/2)δ + √ε ξ; closed form S = (K − εK²/4)⁻¹, which needs
    0 < ε·λ(K) < 4 for every eigenvalue. ``method="lyapunov"`` solves the discrete
    Lyapunov equation instead (an independent route, used as a check).
    """
    eps = _check_step(step_size)
    lam, U = np.linalg.eigh(K)
    if lam[0] <= 0 or eps * lam[-1] >= 4.0:
        raise ValueError(
            f"step_size={eps:g} is unstable for SGLD: needs 0 < step_size·λ(K) < 4, "
            f"λ(K) in [{lam[0]:.6g}, {lam[-1]:.6g}]"
        )
    if method == "lyapunov":
        A = np.eye(len(K)) - 0.5 * eps * K
        return _stationary_cov(A, eps * np.eye(len(K)), f"step_size={eps:g}")
    if method != "closed":
        raise ValueError(f"method must be 'closed' or 'lyapunov', got {method!r}")
    # Eigen-form keeps S symmetric positive definite to rounding.
    return (U / (lam - 0.25 * eps * lam**2)) @ U.T


def preconditioned_sgld_stationary_cov(
    K: np.ndarray, step_size: float, precond: np.ndarray
) -> np.ndarray:
    """Stationary covariance (s, s) of SGLD with a fixed diagonal preconditioner G (s,).

    δ' = (I − (ε/2) diag(G) K) δ + √(εG) ⊙ ξ. A constant G needs no Γ correction, so the
    law tends to K⁻¹ as ε → 0; at finite ε the bias depends on G.
    """
    eps = _check_step(step_size)
    G = np.asarray(precond, dtype=float)
    if G.shape != (len(K),) or not np.all(G > 0):
        raise ValueError(f"precond must be a positive vector of shape ({len(K)},)")
    A = np.eye(len(K)) - 0.5 * eps * G[:, None] * K
    return _stationary_cov(A, np.diag(eps * G), f"step_size={eps:g} with this precond")


def sghmc_stationary_cov(
    K: np.ndarray, step_size: float, friction: float, full: bool = False
) -> np.ndarray:
    """Stationary covariance of SGHMC on U = ½δᵀKδ.

    v ← v + εp; p ← (1 − εα)p − ε∇U(v_new) + √(2αε) ξ, i.e. z = (δ, p) evolves by
    A = [[I, εI], [−εK, (1 − εα)I − ε²K]] with noise blockdiag(0, 2αεI).
    Returns the δ block (s, s), or the covariance of z (2s, 2s) when ``full``.
    """
    eps = _check_step(step_size)
    alpha = float(friction)
    if not alpha > 0:
        raise ValueError(f"friction must be positive, got {alpha}")
    s = len(K)
    eye = np.eye(s)
    A = np.block([[eye, eps * eye], [-eps * K, (1 - eps * alpha) * eye - eps**2 * K]])
    Q = np.zeros((2 * s, 2 * s))
    Q[s:, s:] = 2 * alpha * eps * eye
    P = _stationary_cov(A, Q, f"step_size={eps:g}, friction={alpha:g}")
    return P if full else P[:s, :s]


@dataclass(frozen=True, eq=False)
class LinearGaussianProblem:
    """A linear–Gaussian problem with its exact local posterior and observables.

    X_train (n, p), y_train (n,); X_eval (n_E, p), y_eval (n_E,) define φ (``None``:
    E is the training set); X_probe (m, p), y_probe (m,) are the probe items; ``free``
    is the sorted index array S (s,) of the component's coordinates.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_eval: np.ndarray | None
    y_eval: np.ndarray | None
    X_probe: np.ndarray
    y_probe: np.ndarray
    free: np.ndarray
    nbeta: float = 30.0
    gamma: float = 300.0

    def __post_init__(self) -> None:
        if (self.X_eval is None) != (self.y_eval is None):
            raise ValueError("X_eval and y_eval must both be given or both be None")
        for name in ("X_train", "y_train", "X_eval", "y_eval", "X_probe", "y_probe"):
            val = getattr(self, name)
            if val is not None:
                arr = np.array(val, dtype=float)
                arr.flags.writeable = False
                object.__setattr__(self, name, arr)
        p = self.X_train.shape[1]
        S = np.array(self.free, dtype=int)
        if S.ndim != 1 or len(S) == 0 or np.any(np.diff(S) <= 0) or S[0] < 0 or S[-1] >= p:
            raise ValueError(f"free must be a non-empty sorted array of distinct ints in [0, {p})")
        S.flags.writeable = False
        object.__setattr__(self, "free", S)
        if not self.nbeta > 0 or not self.gamma >= 0:
            raise ValueError("nbeta must be positive and gamma non-negative")

    @classmethod
    def make(
        cls,
        n: int = 200,
        p: int = 6,
        n_eval: int | None = 100,
        n_probe: int = 8,
        free: Sequence[int] | None = None,
        nbeta: float = 30.0,
        gamma: float = 300.0,
        noise: float = 0.5,
        seed: int = 0,
    ) -> LinearGaussianProblem:
        """Reproducible random problem: Gaussian X with unequal column scales (so K is
        anisotropic), y = X w_true + noise·N(0, 1). ``n_eval=None`` makes E the training
        set; ``free=None`` frees every coordinate."""
        rng = np.random.default_rng(seed)
        scales = np.geomspace(0.5, 2.0, p)
        w_true = rng.standard_normal(p)

        def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
            X = rng.standard_normal((k, p)) * scales
            return X, X @ w_true + noise * rng.standard_normal(k)

        X_train, y_train = draw(n)
        X_eval, y_eval = draw(n_eval) if n_eval is not None else (None, None)
        X_probe, y_probe = draw(n_probe)
        S = np.arange(p) if free is None else np.asarray(free)
        return cls(X_train, y_train, X_eval, y_eval, X_probe, y_probe, S, nbeta, gamma)

    @property
    def dim(self) -> int:
        """s = |S|."""
        return len(self.free)

    def _eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        if self.X_eval is None:
            return self.X_train, self.y_train
        return self.X_eval, self.y_eval

    @cached_property
    def w_star(self) -> np.ndarray:
        """Least-squares fit (p,); the gradient of L_n vanishes there."""
        return np.linalg.lstsq(self.X_train, self.y_train, rcond=None)[0]

    @cached_property
    def K(self) -> np.ndarray:
        """Precision (s, s) of the local posterior: nβ·H_S + γI."""
        XS = self.X_train[:, self.free]
        return self.nbeta * (XS.T @ XS) / len(XS) + self.gamma * np.eye(self.dim)

    @cached_property
    def posterior_cov(self) -> np.ndarray:
        """Σ = K⁻¹ (s, s)."""
        return np.linalg.inv(self.K)

    def loss_at_star(self) -> tuple[float, np.ndarray]:
        """(L_E(w*), ℓ_i(w*) for the probes (m,)) — offsets of the raw observables."""
        X_E, y_E = self._eval_set()
        return (
            0.5 * float(np.mean((y_E - X_E @ self.w_star) ** 2)),
            0.5 * (self.y_probe - self.X_probe @ self.w_star) ** 2,
        )

    def phi_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """(H_E restricted to S (s, s), ∇L_E(w*) restricted to S (s,)): φ = ½δᵀHδ + gᵀδ."""
        X_E, y_E = self._eval_set()
        XS = X_E[:, self.free]
        resid = y_E - X_E @ self.w_star
        return XS.T @ XS / len(XS), -XS.T @ resid / len(XS)

    def probe_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """(x_i x_iᵀ (m, s, s), −e_i x_i (m, s)) with x_i restricted to S:
        ℓ_i(w) − ℓ_i(w*) = ½δᵀ(x_i x_iᵀ)δ + (−e_i x_i)ᵀδ."""
        XS = self.X_probe[:, self.free]
        e = self.y_probe - self.X_probe @ self.w_star
        return XS[:, :, None] * XS[:, None, :], -e[:, None] * XS

    def mean_phi(self, cov: np.ndarray) -> float:
        """⟨φ⟩ = ½ tr(H_E cov)."""
        return quad_mean(self.phi_terms()[0], cov)

    def chi(self, cov: np.ndarray) -> np.ndarray:
        """χ_i = −Cov(φ, ℓ_i − L_E) for δ ~ N(0, cov); returns (m,)."""
        H, g = self.phi_terms()
        XS = self.X_probe[:, self.free]
        lin = self.probe_terms()[1]
        M = cov @ H @ cov
        # ℓ_i − L_E has quadratic part x_i x_iᵀ − H_E and linear part −e_i x_i − g_E.
        quad = 0.5 * (np.einsum("ma,ab,mb->m", XS, M, XS) - np.sum(H * M))
        linear = (lin - g) @ (cov @ g)
        return -(quad + linear)

    def chi_posterior(self) -> np.ndarray:
        """χ_i under the exact local posterior, (m,)."""
        return self.chi(self.posterior_cov)

    def chi_sgld(self, step_size: float) -> np.ndarray:
        """χ_i under the stationary law of full-batch SGLD — what a chain estimates, (m,)."""
        return self.chi(sgld_stationary_cov(self.K, step_size))

    def mean_and_cov_of_observables(self, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean (m+1,) and covariance (m+1, m+1) of o = (φ, ℓ_1, …, ℓ_m) for δ ~ N(0, cov).

        The probe entries are raw losses (offset by ℓ_i(w*)); eval_loss = φ + L_E(w*).
        """
        H, g = self.phi_terms()
        P, lin = self.probe_terms()
        Qs = np.concatenate([H[None], P])
        ls = np.concatenate([g[None], lin])
        mean = 0.5 * np.einsum("kab,ba->k", Qs, cov)
        mean[1:] += self.loss_at_star()[1]
        T = Qs @ cov
        out = 0.5 * np.einsum("jab,kba->jk", T, T) + ls @ cov @ ls.T
        return mean, out

    def perturbed_mean_phi(self, i: int, h: float) -> float:
        """⟨φ⟩ under the posterior of the loss (1 − h)L_n + hℓ_i (i a probe index).

        The posterior stays Gaussian with precision K_h = nβ((1 − h)H_S + h x_i x_iᵀ) + γI;
        since ∇L_n(w*) = 0, the potential's gradient at δ = 0 is nβ·h·∇_S ℓ_i(w*), so the
        mean moves to μ_h = −K_h⁻¹ nβ h ∇_S ℓ_i(w*).
        """
        H, g = self.phi_terms()
        P, lin = self.probe_terms()
        K_h = (1 - h) * self.K + h * (self.nbeta * P[i] + self.gamma * np.eye(self.dim))
        cov_h = np.linalg.inv(K_h)
        mu = -cov_h @ (self.nbeta * h * lin[i])
        return quad_mean(H, cov_h) + 0.5 * float(mu @ H @ mu) + float(g @ mu)


def simulate_sgld(
    problem: LinearGaussianProblem,
    step_size: float,
    chain_shape: tuple[int, ...],
    num_draws: int,
    steps_per_draw: int,
    rng: np.random.Generator,
    num_burnin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact draws of thinned full-batch SGLD, from its stationary law or from w*.

    δ' = Aᵏδ + innovation, A = I − εK/2, with the exact innovation covariance
    S − AᵏSAᵏᵀ (S the stationary covariance), so every draw has law N(0, S).

    Args:
        chain_shape: leading shape of independent chains, e.g. ``(4,)`` or
            ``(replications, 4)``.
        num_burnin: ``None`` starts every chain from the stationary law. An integer
            starts it at δ = 0 (the trained weights, as :func:`bayes_susc.sample` does)
            and discards that many steps first; the first kept draw follows
            ``num_burnin + steps_per_draw`` steps, as in the sampler, and has law
            N(0, S − AᵐSAᵐᵀ) with m that number of single steps.

    Returns:
        φ, shape ``(*chain_shape, num_draws)``, and ΔL = ℓ_i − L_E, shape
        ``(*chain_shape, num_draws, probe)``, both up to additive constants (which do
        not change χ).
    """
    K, s = problem.K, problem.dim
    A = np.linalg.matrix_power(np.eye(s) - 0.5 * step_size * K, steps_per_draw)
    S = sgld_stationary_cov(K, step_size)
    Q = S - A @ S @ A.T
    chol_s, chol_q = np.linalg.cholesky(S), np.linalg.cholesky(0.5 * (Q + Q.T))
    delta = np.empty((*chain_shape, num_draws, s))
    if num_burnin is None:
        x = rng.standard_normal((*chain_shape, s)) @ chol_s.T
    else:
        m = num_burnin + steps_per_draw
        A_m = np.linalg.matrix_power(np.eye(s) - 0.5 * step_size * K, m)
        Q_m = S - A_m @ S @ A_m.T
        # Q_m is positive definite for m ≥ 1 (every mode has been driven by noise).
        x = rng.standard_normal((*chain_shape, s)) @ np.linalg.cholesky(0.5 * (Q_m + Q_m.T)).T
    for t in range(num_draws):
        delta[..., t, :] = x
        x = x @ A.T + rng.standard_normal((*chain_shape, s)) @ chol_q.T
    H, g = problem.phi_terms()
    P, lin = problem.probe_terms()
    phi = 0.5 * np.einsum("...a,ab,...b->...", delta, H, delta) + delta @ g
    ell = 0.5 * np.einsum("...a,iab,...b->...i", delta, P, delta) + delta @ lin.T
    return phi, ell - phi[..., None]


def torch_local_posterior(problem: LinearGaussianProblem):
    """The problem as a float64 torch model: ``(LocalPosterior, eval_batches, probe_batches)``.

    A bias-free ``Linear`` at w*, loss ½(y − xᵀw)² per item, one full training batch,
    the free coordinates S as a boolean-mask component, nβ and γ of the problem.
    Imports torch lazily: this module stays numpy-only otherwise.
    """
    import torch

    from bayes_susc.target.components import Component
    from bayes_susc.target.posterior import LocalPosterior

    p = problem.X_train.shape[1]
    model = torch.nn.Linear(p, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(problem.w_star)[None])
    mask = torch.zeros(1, p, dtype=torch.bool)
    mask[0, torch.as_tensor(problem.free.copy())] = True

    def squared_error(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return 0.5 * (m(x).squeeze(-1) - y) ** 2

    def batch(X: np.ndarray, y: np.ndarray) -> list[tuple]:
        return [(torch.tensor(np.array(X)), torch.tensor(np.array(y)))]

    X_eval, y_eval = problem._eval_set()
    posterior = LocalPosterior(
        model,
        squared_error,
        batch(problem.X_train, problem.y_train),
        Component("S", {"weight": mask}),
        nbeta=problem.nbeta,
        gamma=problem.gamma,
    )
    return posterior, batch(X_eval, y_eval), batch(problem.X_probe, problem.y_probe)

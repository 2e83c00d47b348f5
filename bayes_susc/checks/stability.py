"""Is the kernel's step stable on this component? Checked before sampling.

A stochastic-gradient kernel integrates the Langevin diffusion with a fixed step. Along
the stiffest direction of the potential (curvature λmax, the largest Hessian eigenvalue
of U = nβ·L̂ + (γ/2)‖v − v*‖² at w*) the discrete chain is a linear recursion, and beyond a
kernel-specific limit it is unstable: its variance grows without bound, or, when a
bounded nonlinearity (tanh) keeps it finite, the chain explores a distribution that is
not the posterior. Nothing diverges then, the traces can look fine, and χ can be off by
orders of magnitude. So the pipeline measures λmax once per component (Lanczos iteration
on exact Hessian–vector products, :func:`largest_curvature`)
and compares the kernel's step with its limit:

========  =====================  ===========================================
kernel    measure                stable while
========  =====================  ===========================================
sgld      ε·λmax                 < 4   (v ← v − (ε/2)∇U + √ε ξ)
sghmc     ε²·λmax                < 4 − 2εα  (α: friction; unit mass)
sgnht     ε²·λmax                < 4 − 2εξ  (ξ: the larger of A and the
                                 thermostat's start; gradient noise raises ξ
                                 further, by ≈ 1e-7·A on the demo's heads)
mala      –                      always (Metropolis rejects; see its acceptance)
psgld     –                      not known before sampling (the preconditioner
                                 adapts to the gradients)
========  =====================  ===========================================

The SGHMC/SGNHT limits follow from the update v' = v + εp, p' = (1 − εα)p − ελv' on a
quadratic: the transition matrix has determinant 1 − εα and trace 2 − εα − ε²λ, and Jury's
criterion gives ε²λ < 2(2 − εα). An unstable component's entries get the status
``unstable`` (:func:`bayes_susc.estimation.response_matrix.assign_status`).

:func:`check_prior_dominance` asks a second question of the same curvature: how many
directions does the data constrain at all? Along an eigendirection k of the loss Hessian
H_L the posterior precision is nβλ_k + γ; where nβλ_k ≪ γ the prior alone sets the
fluctuation (variance ≈ 1/γ), and the draws there say nothing about the data. Since
H_L ⪰ 0 near a minimum, at most tr(nβH_L)/γ eigenvalues can reach γ, and the trace is
cheap (Hutchinson's estimator, a few Hessian–vector products). A component where that
bound is a small fraction of its dimension is *prior-dominated*: its χ are small and scale
like 1/γ, and a response matrix of such components shows little structure (one cloud in
the PCA). That is a warning, not a failure: the estimates are right for the posterior
asked for; raise nβ or lower γ to let the data speak.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "ComponentChecks",
    "LangevinAcceptance",
    "check_component",
    "PriorDominance",
    "check_langevin_acceptance",
    "largest_curvature",
    "StabilityCheck",
    "check_prior_dominance",
    "check_stability",
    "stability_limit",
]


@dataclass(frozen=True)
class StabilityCheck:
    """The verdict on one component's step.

    Attributes:
        kernel: the kernel's registered name.
        step_size: its ε.
        lambda_max: the stiffest curvature of U at w* (1 / weight²).
        measure: what is compared (``"eps*lambda_max"``, ``"eps^2*lambda_max"``), or
            ``None`` when the kernel has no limit known before sampling.
        value: the measure's value (NaN without a measure).
        limit: the limit it must stay below (NaN without a measure).
        stable: not ``value >= limit`` (True without a measure, or when λmax could
            not be measured because the potential is not finite near w*).
        suggested_step_size: an ε well inside the limit (value = limit / 4), NaN
            without a measure.
        seconds: wall time of the curvature estimate.
    """

    kernel: str
    step_size: float
    lambda_max: float
    measure: str | None
    value: float
    limit: float
    stable: bool
    suggested_step_size: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (``stability.json`` of a run folder)."""
        return asdict(self)

    def message(self, component: str) -> str:
        """One line saying why the step is unstable and which ε would not be."""
        return (
            f"{component}: {self.measure} = {self.value:.3g} >= {self.limit:.3g}, the "
            f"stability limit of {self.kernel} (lambda_max = {self.lambda_max:.4g}): its "
            f"chains do not sample the posterior and its entries get the status "
            f"'unstable'; a stable step size is about {self.suggested_step_size:.2g}"
        )


def stability_limit(kernel: Any, lambda_max: float) -> tuple[str, float, float, float] | None:
    """``(measure, value, limit, suggested ε)`` of a kernel instance on curvature
    ``lambda_max``, or ``None`` for kernels without a limit known before sampling."""
    name = getattr(kernel, "name", None)
    eps = float(kernel.step_size)
    lam = float(lambda_max)
    if name == "sgld":
        return "eps*lambda_max", eps * lam, 4.0, (1.0 / lam if lam > 0 else math.inf)
    if name in ("sghmc", "sgnht"):
        if name == "sghmc":
            friction = float(kernel.friction)
        else:  # the thermostat starts at A unless told otherwise, and settles near A
            friction = max(float(kernel.diffusion), float(kernel.thermostat_start))
        limit = 4.0 - 2.0 * eps * friction
        suggested = math.sqrt(limit / 4.0 / lam) if lam > 0 and limit > 0 else math.nan
        return "eps^2*lambda_max", eps * eps * lam, limit, suggested
    return None


def largest_curvature(
    posterior: Any, batch: Any = None, *, tol: float = 1e-4, seed: int = 0
) -> float:
    """The largest eigenvalue λmax of ∇²U at w* (1 / weight²), by Lanczos iteration.

    U = nβ·L̂_B + (γ/2)‖v − v*‖² on ``batch`` (default: the first training batch), with
    exact Hessian–vector products (double backward) fed to ARPACK's Lanczos
    (``scipy.sparse.linalg.eigsh``, largest algebraic). On the demo's heads it needs
    about 21 products for a relative accuracy of 1e-4, where power iteration
    (:func:`bayes_susc.checks.step_size_bias.stiffest_curvature`) needed 30–100 and could
    stall early (301 against 521 on one head at its rtol 1e-3).
    """
    import torch
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = posterior.train_batches[0] if batch is None else batch
    v = posterior.anchor_vector.detach().clone().requires_grad_(True)
    dim = int(v.numel())
    # Hessian-vector products differentiate twice; fused attention kernels (used by the
    # shared-prefix splits) have no double backward, the math kernel has.
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        loss = posterior.item_losses(v, batch).mean()
        delta = v - posterior.anchor_vector
        potential = posterior.nbeta * loss + 0.5 * posterior.gamma * (delta * delta).sum()
        (grad,) = torch.autograd.grad(potential, v, create_graph=True)

        def hvp(x: np.ndarray) -> np.ndarray:
            u = torch.as_tensor(np.asarray(x).reshape(-1), dtype=v.dtype, device=v.device)
            (hu,) = torch.autograd.grad(grad, v, grad_outputs=u, retain_graph=True)
            return hu.detach().double().cpu().numpy()

        if dim <= 2:  # ARPACK needs k < dim; a 1- or 2-weight Hessian is built whole
            hess = np.stack([hvp(e) for e in np.eye(dim)])
            return float(np.linalg.eigvalsh(0.5 * (hess + hess.T))[-1])
        start = np.random.default_rng(seed).standard_normal(dim)
        operator = LinearOperator((dim, dim), matvec=hvp, dtype=np.float64)
        try:
            values = eigsh(
                operator,
                k=1,
                which="LA",
                tol=tol,
                v0=start,
                ncv=min(dim - 1, 20),
                return_eigenvectors=False,
            )
        except ArpackNoConvergence as exc:
            values = exc.eigenvalues
        except (ValueError, RuntimeError):  # a non-finite product: no curvature to report
            return math.nan
    return float(values[-1]) if len(values) else math.nan


def check_stability(
    posterior: Any, kernel: Any, *, tol: float = 1e-4, seed: int = 0
) -> StabilityCheck:
    """Measure λmax of ``posterior`` at w* and judge ``kernel``'s step against its limit.

    Args:
        posterior: the component's :class:`~bayes_susc.target.posterior.LocalPosterior`.
        kernel: a kernel instance (:func:`bayes_susc.kernels.base.make_kernel`).
        tol: relative accuracy of λmax (:func:`largest_curvature`).
        seed: seed of the Lanczos start vector.
    """
    name = str(getattr(kernel, "name", type(kernel).__name__))
    eps = float(kernel.step_size)
    start = time.perf_counter()
    if stability_limit(kernel, 1.0) is None:
        return StabilityCheck(name, eps, math.nan, None, math.nan, math.nan, True, math.nan, 0.0)
    lam = largest_curvature(posterior, tol=tol, seed=seed)
    seconds = time.perf_counter() - start
    measure, value, limit, suggested = stability_limit(kernel, lam)
    # A curvature that cannot be measured (a non-finite potential near w*) is no verdict
    # on the step: the sampler's divergence flag judges such a component.
    stable = not (math.isfinite(value) and value >= limit)
    return StabilityCheck(name, eps, lam, measure, value, limit, stable, suggested, seconds)


@dataclass(frozen=True)
class PriorDominance:
    """How many directions of a component the data constrains, against the prior.

    Attributes:
        dim: the component's number of weights d.
        data_trace: tr(nβ H_L) at w* (1 / weight²; exact for d ≤ ``probes``, else a
            Hutchinson estimate).
        gamma: the prior's precision γ.
        data_directions_bound: max(tr(nβH_L)/γ, 0), an upper bound on the number of directions
            with nβλ_k ≥ γ (H_L ⪰ 0).
        prior_dominated: the bound is at most ``fraction`` of d.
        fraction: the threshold used.
        seconds: wall time.
    """

    dim: int
    data_trace: float
    gamma: float
    data_directions_bound: float
    prior_dominated: bool
    fraction: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record."""
        return asdict(self)


def check_prior_dominance(
    posterior: Any, batch: Any = None, *, probes: int = 8, fraction: float = 0.1, seed: int = 0
) -> PriorDominance:
    """Bound the number of data-dominated directions of ``posterior`` at w*.

    Args:
        posterior: a :class:`~bayes_susc.target.posterior.LocalPosterior`.
        batch: the batch of the loss Hessian (default: the first training batch).
        probes: Rademacher vectors of the Hutchinson estimate; when d ≤ probes the trace
            is exact (the d unit vectors).
        fraction: prior-dominated when tr(nβH_L)/γ ≤ fraction · d.
        seed: seed of the probe vectors.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    start = time.perf_counter()
    batch = posterior.train_batches[0] if batch is None else batch
    v = posterior.anchor_vector.detach().clone().requires_grad_(True)
    dim = int(v.numel())
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        loss = posterior.nbeta * posterior.item_losses(v, batch).mean()
        (grad,) = torch.autograd.grad(loss, v, create_graph=True)
        if dim <= probes:
            vectors = torch.eye(dim, dtype=v.dtype, device=v.device)
        else:
            gen = torch.Generator(device=v.device).manual_seed(seed)
            signs = torch.randint(0, 2, (probes, dim), generator=gen, device=v.device)
            vectors = signs.to(v.dtype) * 2 - 1
        quad = []
        for u in vectors:
            (hu,) = torch.autograd.grad(grad, v, grad_outputs=u, retain_graph=True)
            quad.append(float(u @ hu))
    # Rademacher probes: E[uᵀHu] = tr(H); unit vectors: the sum is the trace exactly.
    trace = float(sum(quad)) if dim <= probes else float(np.mean(quad))
    gamma = float(posterior.gamma)
    # Hutchinson's estimate, or a Hessian that is not PSD away from a minimum, can make
    # the trace negative; no count of directions is below zero.
    bound = max(trace / gamma, 0.0) if gamma > 0 else math.inf
    return PriorDominance(
        dim,
        trace,
        gamma,
        bound,
        bool(bound <= fraction * dim),
        float(fraction),
        time.perf_counter() - start,
    )


#: The pipeline's acceptance check: moves made from w* before scoring (the acceptance
#: settles within about ten moves on the demo's heads: 0.06 over the first ten, 0.5–0.8
#: after), moves scored per chain, and chains.
ACCEPTANCE_BURNIN = 20
ACCEPTANCE_MOVES = 30
ACCEPTANCE_CHAINS = 2
#: Below this acceptance the status says ``low_acceptance``. An SGLD chain's acceptance
#: does not fall much below 0.5 at any stable step in high dimension: on isotropic
#: Gaussians of 100–4,000 weights at ε·λ = 0.3–3.5 it stays 0.46–0.87 (it is not at
#: MALA's target, so MALA's d^(-1/3) scaling does not apply), and on the demo's heads it
#: settles at 0.6–0.7. A value below 0.4 means the move is no longer a Langevin move of
#: this potential. Above it, the acceptance does not certify a small bias: at ε·λ = 1.5
#: the stationary variance is inflated 1.6× with acceptance 0.53, which only the
#: stability ratio and Richardson extrapolation (:mod:`~bayes_susc.checks.step_size_bias`)
#: measure.
ACCEPTANCE_FLOOR = 0.4


@dataclass(frozen=True)
class LangevinAcceptance:
    """How often MALA would accept the kernel's Langevin move on this component.

    Attributes:
        kernel: the kernel's registered name.
        scored: whether the kernel makes the plain Langevin move (only ``sgld``); an
            unscored check passes.
        value: mean Metropolis–Hastings acceptance probability of the scored moves
            (NaN when not scored).
        floor: the value below which the check fails (:data:`ACCEPTANCE_FLOOR`).
        passed: not ``value < floor``.
        moves, burnin, chains: the scored moves per chain, the unscored moves before
            them, and the chains.
        seconds: wall time.
    """

    kernel: str
    scored: bool
    value: float
    floor: float
    passed: bool
    moves: int
    burnin: int
    chains: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record."""
        return asdict(self)

    def message(self, component: str) -> str:
        """One line for the user when the check fails."""
        return (
            f"{component}: MALA would accept {self.kernel}'s Langevin move with "
            f"probability {self.value:.2f}, below {self.floor:g}: the move no longer "
            "follows this potential; its entries get the status 'low_acceptance' (lower "
            "step_size)"
        )


def check_langevin_acceptance(posterior: Any, kernel: Any, *, seed: int = 0) -> LangevinAcceptance:
    """Score the kernel's Langevin move with MALA's acceptance probability.

    Chains start at w* on the component's first training batch (the batch a step of
    the run uses), make :data:`ACCEPTANCE_BURNIN` unscored SGLD moves and then
    :data:`ACCEPTANCE_MOVES` scored ones
    (:func:`bayes_susc.checks.health.mala_acceptance`): one gradient per move and chain.
    A stable step (:func:`check_stability`) can still move the chain far from where
    MALA would keep it, in many directions at once: 1 − acceptance measures the
    per-step distortion, which the stability limit (one direction) does not.

    Args:
        posterior: the component's :class:`~bayes_susc.target.posterior.LocalPosterior`.
        kernel: a kernel instance; only ``sgld`` makes the plain Langevin move.
        seed: noise seed of the scored chains.
    """
    from bayes_susc.checks.health import mala_acceptance

    name = str(getattr(kernel, "name", type(kernel).__name__))
    if name != "sgld":
        return LangevinAcceptance(name, False, math.nan, ACCEPTANCE_FLOOR, True, 0, 0, 0, 0.0)
    start = time.perf_counter()
    probs = mala_acceptance(
        posterior,
        float(kernel.step_size),
        batch=posterior.train_batches[0],
        num_chains=ACCEPTANCE_CHAINS,
        num_moves=ACCEPTANCE_MOVES,
        num_burnin=ACCEPTANCE_BURNIN,
        seed=seed,
    )
    value = float(np.mean(probs))
    return LangevinAcceptance(
        name,
        True,
        value,
        ACCEPTANCE_FLOOR,
        not value < ACCEPTANCE_FLOOR,
        ACCEPTANCE_MOVES,
        ACCEPTANCE_BURNIN,
        ACCEPTANCE_CHAINS,
        time.perf_counter() - start,
    )


@dataclass(frozen=True)
class ComponentChecks:
    """One component's checks before sampling, as a job an executor can run
    (:func:`check_component`): small and picklable.

    Attributes:
        component: the component (:class:`bayes_susc.Component`).
        nbeta, gamma: its local posterior's nβ and γ.
        kernel: the kernel instance that will sample it.
        seed: seed of the checks' random probes and moves.
        acceptance_only: only :func:`check_langevin_acceptance` (a folder that has the
            other verdicts already).
    """

    component: Any
    nbeta: float
    gamma: float
    kernel: Any
    seed: int = 0
    acceptance_only: bool = False


def check_component(problem: Any, job: ComponentChecks) -> dict[str, Any]:
    """Run one component's checks before sampling; ``problem`` is a
    :class:`bayes_susc.sampling.executor.Problem` (model, loss, training batches).

    Returns:
        ``check_stability(...).to_dict()`` with ``"prior"`` (``check_prior_dominance``)
        and ``"acceptance"`` (``check_langevin_acceptance``) added as dicts; only
        ``{"acceptance": ...}`` with ``job.acceptance_only``. Runs in a worker process
        of the run's executor as well as here: the components are checked side by side.
    """
    from bayes_susc.target.posterior import LocalPosterior

    posterior = LocalPosterior(
        problem.model,
        problem.loss_fn,
        problem.train_data,
        job.component,
        nbeta=job.nbeta,
        gamma=job.gamma,
    )
    record: dict[str, Any] = {}
    if not job.acceptance_only:
        record = check_stability(posterior, job.kernel, seed=job.seed).to_dict()
        record["prior"] = check_prior_dominance(posterior, seed=job.seed).to_dict()
    record["acceptance"] = check_langevin_acceptance(posterior, job.kernel, seed=job.seed).to_dict()
    return record

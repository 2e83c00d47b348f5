"""Is the kernel's step stable on this component? Checked before sampling.

A stochastic-gradient kernel integrates the Langevin diffusion with a fixed step. Along
the stiffest direction of the potential (curvature λmax, the largest Hessian eigenvalue
of U = nβ·L̂ + (γ/2)‖v − v*‖² at w*) the discrete chain is a linear recursion, and beyond a
kernel-specific limit it is unstable: its variance grows without bound, or, when a
bounded nonlinearity (tanh) keeps it finite, the chain explores a distribution that is
not the posterior. Nothing diverges then, the traces can look fine, and χ can be off by
orders of magnitude. So the pipeline measures λmax once per component (power iteration
with exact Hessian–vector products, :func:`bayes_susc.checks.step_size_bias.stiffest_curvature`)
and compares the kernel's step with its limit:

========  =====================  ===========================================
kernel    measure                stable while
========  =====================  ===========================================
sgld      ε·λmax                 < 4   (v ← v − (ε/2)∇U + √ε ξ)
sghmc     ε²·λmax                < 4 − 2εα  (α: friction; unit mass)
sgnht     ε²·λmax                < 4 − 2εA  (the thermostat's start A)
mala      –                      always (Metropolis rejects; see its acceptance)
psgld     –                      not known before sampling (the preconditioner
                                 adapts to the gradients)
========  =====================  ===========================================

The SGHMC/SGNHT limits follow from the update v' = v + εp, p' = (1 − εα)p − ελv' on a
quadratic: the transition matrix has determinant 1 − εα and trace 2 − εα − ε²λ, and Jury's
criterion gives ε²λ < 2(2 − εα). An unstable component's entries get the status
``unstable`` (:func:`bayes_susc.estimation.response_matrix.assign_status`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["StabilityCheck", "check_stability", "stability_limit"]


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
        friction = float(kernel.friction if name == "sghmc" else kernel.diffusion)
        limit = 4.0 - 2.0 * eps * friction
        suggested = math.sqrt(limit / 4.0 / lam) if lam > 0 and limit > 0 else math.nan
        return "eps^2*lambda_max", eps * eps * lam, limit, suggested
    return None


def check_stability(
    posterior: Any, kernel: Any, *, iters: int = 200, rtol: float = 1e-5, seed: int = 0
) -> StabilityCheck:
    """Measure λmax of ``posterior`` at w* and judge ``kernel``'s step against its limit.

    Args:
        posterior: the component's :class:`~bayes_susc.target.posterior.LocalPosterior`.
        kernel: a kernel instance (:func:`bayes_susc.kernels.base.make_kernel`).
        iters: at most this many power iterations (each one Hessian–vector product on
            the first training batch).
        rtol: stop when λ changes by less than this fraction between iterations. The
            Rayleigh quotient approaches λmax from below and can stall before it: at
            1e-3 one demo head stopped at 301 against 521 (1e-4: 521.1, 1e-6: 521.2),
            hence the tight default (0.2-2.4 s per demo head on 2 cores).
        seed: seed of the start vector.
    """
    from bayes_susc.checks.step_size_bias import stiffest_curvature

    name = str(getattr(kernel, "name", type(kernel).__name__))
    eps = float(kernel.step_size)
    start = time.perf_counter()
    if stability_limit(kernel, 1.0) is None:
        return StabilityCheck(name, eps, math.nan, None, math.nan, math.nan, True, math.nan, 0.0)
    lam = stiffest_curvature(posterior, iters=iters, rtol=rtol, seed=seed)
    seconds = time.perf_counter() - start
    measure, value, limit, suggested = stability_limit(kernel, lam)
    # A curvature that cannot be measured (a non-finite potential near w*) is no verdict
    # on the step: the sampler's divergence flag judges such a component.
    stable = not (math.isfinite(value) and value >= limit)
    return StabilityCheck(name, eps, lam, measure, value, limit, stable, suggested, seconds)

"""Stochastic gradient Nosé–Hoover thermostat (after Ding et al. 2014).

The thermostat ξ is SGHMC's friction made adaptive: it rises while the momentum runs
hotter than its discrete update's equilibrium temperature, and so absorbs gradient noise
of unknown size. Where ξ starts, where it settles and how fast it gets there were
measured (``diagnostics/sgnht_thermostat.py``); the figures are quoted in :class:`SGNHT`.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from bayes_susc.kernels.base import GradFn, NoiseSource, gradient_info, register
from bayes_susc.kernels.diffusions import underdamped_momentum
from bayes_susc.validation import check_positive

#: The smallest allowed ``thermostat_relaxation``: below 2 the linearised pair (ξ, kinetic
#: energy), s² + 2A·s + 2A²/r = 0 in time units, is underdamped and ξ overshoots.
MIN_THERMOSTAT_RELAXATION = 2.0


class SGNHTState(NamedTuple):
    position: torch.Tensor  # (chains, dim)
    momentum: torch.Tensor  # (chains, dim)
    thermostat: torch.Tensor  # ξ, (chains, 1)


@register("sgnht")
class SGNHT:
    """SGHMC whose friction is a thermostat ξ that tracks the kinetic energy.

    One step (unit mass, d the component's dimension, η ~ N(0, I)):

        v ← v + ε p
        p ← (1 − εξ) p − ε∇Û(v) + √(2Aε) η
        ξ ← ξ + (ε A²/r) · [(1 − εξ/2) · pᵀp/d − 1]

    **What ξ is for.** A minibatch gradient ∇Û = ∇U + e, e of covariance B, adds ε²B to
    the momentum's noise each step, so SGHMC with friction α runs hot by
    (α + ε·b̄/2)/α, b̄ = tr(B)/d. ξ instead settles where its friction balances all the
    noise, ξ* = A + ε·b̄/2. On a quadratic this integrator has, at stationarity,
    λ·Var δ = (1 − εξ/2)·Var p in every eigendirection (exactly, for any ε, and with
    independent gradient errors), so the thermostat's target holds tr(K·Cov δ)/d, the
    mean position variance relative to the posterior's, at 1. Measured with injected
    isotropic noise εb/2 = A: SGNHT 1.000 ± 0.003 × the posterior variances, SGHMC at
    friction A 2.006 ± 0.005 (predicted 2.005). One scalar ξ corrects the mean only:
    with anisotropic noise coordinate a runs at ≈ (A + εb_a/2)/ξ*.

    **It assumes independent gradient errors from step to step.** The driver visits each
    batch once per epoch, so an epoch's errors sum to zero: the momentum (memory
    ≈ 1/(εξ) steps) feels them, the positions (memory ≫ one epoch) hardly do, and where
    ε·b̄/2 is not small against A the thermostat over-cools. Linear–Gaussian model,
    nβ = 3000, 10 batches, ε·b̄/2 = 0.76·A: SGNHT 0.765 ± 0.006 and SGHMC 1.044 ± 0.009
    with the epoch order; SGNHT 0.987 ± 0.008 and SGHMC 1.786 ± 0.013 with batches
    drawn independently. Prefer ``sghmc`` there.

    **Where ξ starts: A** (``thermostat_start``), its fixed point without gradient noise,
    which is where it settles on real targets at the defaults. The measured excess
    ε·b̄/(2A) is 3e-7 (demo head L0H0), 1.5e-7 (L1H0) and 8e-5 (linear–Gaussian model,
    nβ = 30, batches of 20); ξ settled at 0.9994·A (L1H0 over steps 750–1,500; sd of
    the 4-chain mean 0.0015) and 0.994·A (linear–Gaussian), after a dip to 0.987·A in
    the first few hundred steps while the positions, started at w*, take up their
    energy. At these settings SGNHT and SGHMC with α = A sample the same law.

    **Why (1 − εξ/2)·pᵀp/d = 1 and not pᵀp/d = 1 (Ding et al.).** Without a gradient
    the discrete update p ← (1 − εξ)p + √(2Aε)η has stationary variance
    A/(ξ(1 − εξ/2)). Driving pᵀp/d to 1 puts ξ at ≈ A/(1 − εA/2) (measured 1.055·A on a
    demo head) and runs the positions cold by ≈ εA/2: 0.927 ± 0.015 × the posterior
    variances on the linear–Gaussian model at the defaults.

    **How fast ξ moves.** Near ξ* the momentum's temperature is ≈ ξ*/ξ (it relaxes in
    1/(2ξ) time units, fast), so dξ/dt ≈ (A²/r)(ξ*/ξ − 1): ξ relaxes to ξ* with time
    constant r·ξ*/A² time units, r·ξ*/(εA²) steps, 200 at the defaults (ε = 1e-3,
    A = 100, r = 20). Measured: ξ covered 1 − 1/e of its way in 243–348 steps on the
    study's targets (ξ* from 1.05·A to 2·A). r is that time in units of the momentum's
    relaxation time 1/A; the thermostat's mass is Q = r/A². The previous rule,
    ξ ← ξ + ε(pᵀp/d − 1), is Q = 1 (r = A²): ≈ ξ*/ε = 10⁵ steps at the defaults, so ξ
    never left its start and SGNHT was SGHMC with α = A. r ≥ 2 keeps the linearised
    pair (ξ, kinetic energy) overdamped. ξ fluctuates around ξ* with standard deviation
    ≈ A/√(d·r) (the continuous dynamics' stationary law has ξ ~ N(ξ*, 1/(dQ))): 0.35 % of
    A for a 4,144-weight head; this leaves the position law unchanged in the continuous
    limit. The figures come from ``diagnostics/sgnht_thermostat.py`` (report in
    ``diagnostics/reports/sgnht_thermostat/``) and ``tests/test_sgnht.py``.

    Stability on a quadratic of curvature λmax needs ε²λmax < 4 − 2εξ for the largest
    friction the chain sees: max(A, ``thermostat_start``), plus the gradient-noise excess.

    Args:
        step_size: ε (> 0); default 1e-3.
        diffusion: A (> 0) with εA < 1, the injected noise; default 100.
        thermostat_start: ξ at the first step (> 0, with ε·start < 1); default ``None``,
            meaning A: the fixed point without gradient noise.
        thermostat_relaxation: r (≥ 2), ξ's relaxation time in units of the momentum's
            (1/A); ξ relaxes in about r/(εA) steps. Default 20: 200 steps at the
            defaults, short against a run, long against the momentum's 1/(εA) = 10.
    """

    name: ClassVar[str]
    full_batch: ClassVar[bool] = False

    def __init__(
        self,
        step_size: float = 1e-3,
        diffusion: float = 100.0,
        thermostat_start: float | None = None,
        thermostat_relaxation: float = 20.0,
    ) -> None:
        self.step_size = check_positive("step_size", step_size)
        self.diffusion = check_positive("diffusion", diffusion)
        if self.step_size * self.diffusion >= 1:
            # p keeps a fraction 1 − εξ of itself per step; at εξ ≥ 1 it flips sign.
            raise ValueError(
                f"step_size * diffusion must be < 1, got {self.step_size} * {self.diffusion}"
            )
        start = self.diffusion if thermostat_start is None else thermostat_start
        self.thermostat_start = check_positive("thermostat_start", start)
        if self.step_size * self.thermostat_start >= 1:
            raise ValueError(
                f"step_size * thermostat_start must be < 1, got {self.step_size} * "
                f"{self.thermostat_start}"
            )
        self.thermostat_relaxation = check_positive("thermostat_relaxation", thermostat_relaxation)
        if self.thermostat_relaxation < MIN_THERMOSTAT_RELAXATION:
            raise ValueError(
                f"thermostat_relaxation must be >= {MIN_THERMOSTAT_RELAXATION} (faster, the "
                f"thermostat overshoots its fixed point), got {self.thermostat_relaxation!r}"
            )

    @property
    def thermostat_gain(self) -> float:
        """ε/Q = ε·A²/r, the factor of the thermostat's update."""
        return self.step_size * self.diffusion**2 / self.thermostat_relaxation

    @property
    def relaxation_steps(self) -> float:
        """r/(εA): steps for ξ to relax (1/e) towards ξ* when ξ* ≈ A."""
        return self.thermostat_relaxation / (self.step_size * self.diffusion)

    def hyperparameters(self) -> dict[str, float]:
        """Every argument, the start resolved (A when it was ``None``): a run record."""
        return {
            "step_size": self.step_size,
            "diffusion": self.diffusion,
            "thermostat_start": self.thermostat_start,
            "thermostat_relaxation": self.thermostat_relaxation,
        }

    def init(self, position: torch.Tensor, grad_fn: GradFn, noise: NoiseSource) -> SGNHTState:
        """Momentum from N(0, I), ξ at ``thermostat_start`` in every chain."""
        thermostat = torch.full(
            (position.shape[0], 1),
            self.thermostat_start,
            dtype=position.dtype,
            device=position.device,
        )
        return SGNHTState(position, noise.normal(position.shape[-1]), thermostat)

    def step(
        self, state: SGNHTState, grad_fn: GradFn, noise: NoiseSource
    ) -> tuple[SGNHTState, dict[str, torch.Tensor]]:
        """One step; ``info`` adds ``thermostat`` (ξ after the step, ``(chains,)``)."""
        eps, xi = self.step_size, state.thermostat
        position = state.position + eps * state.momentum
        res = grad_fn(position)
        eta = noise.normal(position.shape[-1])
        momentum = underdamped_momentum(state.momentum, res.grad, eps, xi, self.diffusion, eta)
        kinetic = (momentum * momentum).mean(-1, keepdim=True)
        # (1 − εξ/2)·pᵀp/d is 1 in expectation exactly when the friction ξ that produced
        # p balances the noise, the discrete update's own temperature (see the docstring).
        thermostat = xi + self.thermostat_gain * ((1.0 - 0.5 * eps * xi) * kinetic - 1.0)
        info = gradient_info(res)
        info["thermostat"] = thermostat.squeeze(-1)
        return SGNHTState(position, momentum, thermostat), info

"""Step-size bias of SG-MCMC susceptibilities, and Richardson extrapolation to ε → 0.

SG kernels at finite step size ε sample a law that is not the posterior: for full-batch
SGLD on a quadratic potential the stationary covariance is (K − εK²/4)⁻¹ = Σ + εI/4 +
O(ε²), so every χ carries a bias that is first order in ε (≈ 10% at the literature
defaults ε = 1e-3, γ = 300, nβ = 30 on a 3-weight linear–Gaussian example). Running
the same component at ε, ε/2 (and ε/4) and extrapolating the estimates to ε = 0
removes the leading terms:

    χ̂₀ = Σ_j w_j χ̂(ε_j),   w_j = Π_{m≠j} ε_m / (ε_m − ε_j)

(the Lagrange polynomial through the points, evaluated at 0: 2χ(ε/2) − χ(ε) for two
step sizes, (8χ(ε/4) − 6χ(ε/2) + χ(ε))/3 for three). The runs are independent, so
SE² = Σ w_j² SE_j², and the interval half-width combines the runs' half-widths the same
way. The extrapolated interval is wider than each run's: the price of removing bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from bayes_susc.validation import check_positive


def richardson_weights(step_sizes: Sequence[float]) -> np.ndarray:
    """Weights w_j with Σ_j w_j χ(ε_j) = the interpolating polynomial at ε = 0, ``(k,)``."""
    eps = np.array([check_positive("step_sizes", float(e)) for e in step_sizes])
    if eps.size < 2:
        raise ValueError(f"step_sizes needs at least two step sizes, got {eps.size}")
    if np.unique(eps).size != eps.size:
        raise ValueError(f"step_sizes must be distinct, got {eps.tolist()}")
    weights = np.ones(eps.size)
    for j in range(eps.size):
        for m in range(eps.size):
            if m != j:
                weights[j] *= eps[m] / (eps[m] - eps[j])
    return weights


def extrapolate(estimates: Sequence[xr.Dataset], step_sizes: Sequence[float]) -> xr.Dataset:
    """Richardson-extrapolated χ from estimates of the same entries at several step sizes.

    Args:
        estimates: outputs of :func:`bayes_susc.estimation.susceptibility.estimate` (or
            ``estimate_many``), one per step size, over the same entries; each needs
            ``chi``, ``se``, ``ci_low``, ``ci_high``.
        step_sizes: the ε of each run (any order, distinct, > 0).

    Returns:
        Dataset over the entries with ``chi`` (extrapolated), ``se``, ``ci_low``,
        ``ci_high``, ``chi_plain`` (the estimate at the largest ε), ``bias`` (plain −
        extrapolated, the estimated step-size bias of the plain estimate) and
        ``bias_exceeds_interval`` (|bias| larger than the plain interval's half-width:
        the plain interval is then not to be trusted for the posterior χ). Attrs hold the
        step sizes and weights.
    """
    if len(estimates) != len(step_sizes):
        raise ValueError(
            f"estimates and step_sizes must pair up, got {len(estimates)} and {len(step_sizes)}"
        )
    weights = richardson_weights(step_sizes)
    for k, ds in enumerate(estimates):
        missing = [v for v in ("chi", "se", "ci_low", "ci_high") if v not in ds]
        if missing:
            raise ValueError(f"estimates[{k}] lacks {missing}; pass outputs of estimate()")
        if ds["chi"].shape != estimates[0]["chi"].shape:
            raise ValueError(
                f"estimates[{k}] has shape {ds['chi'].shape}, estimates[0] has "
                f"{estimates[0]['chi'].shape}: they must cover the same entries"
            )
    chi = sum(w * ds["chi"] for w, ds in zip(weights, estimates))
    se = np.sqrt(sum(w**2 * ds["se"] ** 2 for w, ds in zip(weights, estimates)))
    half = np.sqrt(
        sum(w**2 * ((ds["ci_high"] - ds["ci_low"]) / 2) ** 2 for w, ds in zip(weights, estimates))
    )
    plain = estimates[int(np.argmax(step_sizes))]
    bias = plain["chi"] - chi
    plain_half = (plain["ci_high"] - plain["ci_low"]) / 2
    out = xr.Dataset(
        {
            "chi": chi,
            "se": se,
            "ci_low": chi - half,
            "ci_high": chi + half,
            "chi_plain": plain["chi"],
            "bias": bias,
            "bias_exceeds_interval": np.abs(bias) > plain_half,
        }
    )
    out.attrs["step_sizes"] = [float(e) for e in step_sizes]
    out.attrs["richardson_weights"] = weights.tolist()
    return out


def attach_bias(matrix: xr.Dataset, extrapolated: xr.Dataset, **status_kwargs: Any) -> xr.Dataset:
    """The response matrix with the step-size bias of each entry, statuses re-assigned.

    Args:
        matrix: a response matrix over (probe, component) at the user's ε (e.g. from
            :func:`bayes_susc.estimation.response_matrix.build_response_matrix`).
        extrapolated: :func:`extrapolate` of ``estimate_many`` results at ε, ε/2 (...),
            over the same (probe, component).
        **status_kwargs: thresholds for
            :func:`~bayes_susc.estimation.response_matrix.assign_status`.

    Returns:
        ``matrix`` plus ``chi_extrapolated``, ``ci_low_extrapolated``,
        ``ci_high_extrapolated``, ``bias`` and ``bias_exceeds_interval``; an entry whose
        bias exceeds its interval gets status ``"step_size_bias"`` (after the convergence
        reasons).
    """
    from bayes_susc.estimation.response_matrix import assign_status

    if extrapolated["chi"].shape != matrix["chi"].shape:
        raise ValueError(
            f"extrapolated covers shape {extrapolated['chi'].shape}, the matrix "
            f"{matrix['chi'].shape}: pass estimates of the same (probe, component) entries"
        )
    out = matrix.copy()
    out["chi_extrapolated"] = extrapolated["chi"]
    out["ci_low_extrapolated"] = extrapolated["ci_low"]
    out["ci_high_extrapolated"] = extrapolated["ci_high"]
    out["bias"] = extrapolated["bias"]
    out["bias_exceeds_interval"] = extrapolated["bias_exceeds_interval"]
    out.attrs["step_sizes"] = extrapolated.attrs.get("step_sizes", [])
    return assign_status(out, **status_kwargs)


def step_size_study(
    posterior: Any,
    kernel: str = "sgld",
    *,
    step_size: float = 1e-3,
    factors: Sequence[float] = (1.0, 0.5),
    num_burnin: int = 0,
    steps_per_draw: int = 1,
    estimate_kwargs: dict[str, Any] | None = None,
    **sample_kwargs: Any,
) -> tuple[xr.Dataset, list[Any]]:
    """Run one component at ε·factor for each factor and extrapolate χ to ε = 0.

    Burn-in and thinning scale with 1/factor so that every run covers the same
    *dynamical* time (a run at ε/2 takes twice the steps) and has a similar ESS.

    Args:
        posterior: the component's :class:`~bayes_susc.LocalPosterior`.
        kernel: a registered SG kernel name.
        step_size: the user's ε (factor 1).
        factors: multipliers of ε, e.g. ``(1, 0.5)`` or ``(1, 0.5, 0.25)``.
        num_burnin: burn-in steps at factor 1; scaled by 1/factor for the others.
        steps_per_draw: thinning at factor 1; scaled by 1/factor for the others.
        estimate_kwargs: passed to :func:`bayes_susc.estimation.susceptibility.estimate`.
        **sample_kwargs: passed to :func:`bayes_susc.sample` (eval_data, probe_data,
            num_chains, num_draws, seed, ...).

    Returns:
        ``(extrapolated, runs)``: the :func:`extrapolate` Dataset and the sampling
        results, one per factor.
    """
    from bayes_susc.estimation.susceptibility import estimate
    from bayes_susc.sampling.driver import sample

    step_size = check_positive("step_size", step_size)
    factors = [check_positive("factors", f) for f in factors]
    runs, estimates = [], []
    for factor in factors:
        data = sample(
            posterior,
            kernel,
            step_size=step_size * factor,
            num_burnin=int(round(num_burnin / factor)),
            steps_per_draw=max(1, int(round(steps_per_draw / factor))),
            **sample_kwargs,
        )
        runs.append(data)
        estimates.append(estimate(data, **(estimate_kwargs or {})))
    return extrapolate(estimates, [step_size * f for f in factors]), runs


def stiffest_curvature(
    posterior: Any,
    batch: Any = None,
    *,
    iters: int = 100,
    rtol: float = 1e-6,
    seed: int = 0,
) -> float:
    """Largest eigenvalue λ of the Hessian ∇²U at w* (units: 1 / weight²).

    Power iteration with exact Hessian–vector products (double backward through the
    model) of U = nβ·L̂_B + (γ/2)‖v − v*‖² on ``batch`` (default: the first training
    batch). Power iteration finds the eigenvalue of largest magnitude; at a trained
    minimum that is the stiffest positive curvature. It sets SGLD's step-size bias:
    along that direction the stationary variance is inflated by ελ/(4 − ελ) (see
    :func:`sgld_variance_inflation`), and ελ ≥ 4 is unstable.
    """
    import torch

    iters = int(iters)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = posterior.train_batches[0] if batch is None else batch
    v = posterior.anchor_vector.detach().clone().requires_grad_(True)
    # Hessian-vector products differentiate twice; fused attention kernels (used by the
    # shared-prefix splits) have no double backward, the math kernel has.
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        loss = posterior.item_losses(v, batch).mean()
        delta = v - posterior.anchor_vector
        potential = posterior.nbeta * loss + 0.5 * posterior.gamma * (delta * delta).sum()
        (grad,) = torch.autograd.grad(potential, v, create_graph=True)
        gen = torch.Generator(device=v.device).manual_seed(seed)
        u = torch.randn(v.shape, generator=gen, device=v.device, dtype=v.dtype)
        u = u / u.norm()
        eigenvalue = 0.0
        for _ in range(iters):
            (hu,) = torch.autograd.grad(grad, v, grad_outputs=u, retain_graph=True)
            new = float(u @ hu)
            norm = hu.norm()
            if not torch.isfinite(norm) or norm == 0:
                return new
            u = (hu / norm).detach()
            if abs(new - eigenvalue) <= rtol * abs(new):
                return new
            eigenvalue = new
    return eigenvalue


def sgld_variance_inflation(step_size: float, curvature: float) -> float:
    """Relative excess variance of full-batch SGLD along a direction of curvature λ.

    On a quadratic potential the stationary variance is 1/(λ − ελ²/4) instead of 1/λ,
    i.e. larger by the factor 1 + ελ/(4 − ελ); returns ελ/(4 − ελ) (``inf`` when
    ελ ≥ 4, the chain is unstable).
    """
    x = float(step_size) * float(curvature)
    return float("inf") if x >= 4.0 else x / (4.0 - x)

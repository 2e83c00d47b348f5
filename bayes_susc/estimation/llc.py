"""The restricted local learning coefficient of a component, from draws already taken.

Along a component's localized, tempered posterior the expected rise of the loss is
about λ/(nβ) for a local learning coefficient λ, so

    λ̂ = nβ · (⟨L(w)⟩ − L(w*)) = nβ · mean(φ),

with φ = L_E(w) − L_E(w*) the observable every run records (DESIGN.md §1). Measured on
a training-distribution batch this is the *restricted* LLC of the refined-LLC work: the
learning coefficient of the component alone, the rest frozen at w*. Its standard error
is nβ times the Monte Carlo standard error of the mean of φ (ESS of the mean), and its
interval a t interval with ESS − 1 degrees of freedom. On a quadratic loss near a minimum
with the whole training set as the eval set, E[φ] = ½·tr(H S) (H the loss Hessian, S the
chain's stationary covariance), which the tests use as ground truth.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

from bayes_susc.estimation import convergence
from bayes_susc.storage.draws import get_group, group_names
from bayes_susc.validation import check_fraction, check_positive

__all__ = ["local_learning_coefficient"]


def _recorded_nbeta(data: Any) -> float | None:
    post = get_group(data, "posterior")
    raw = post.attrs.get("bayes_susc_config")
    config = json.loads(raw) if isinstance(raw, str) else {}
    value = config.get("nbeta")
    return None if value is None else float(value)


def local_learning_coefficient(
    data: Any, *, nbeta: float | None = None, confidence: float = 0.95
) -> xr.Dataset:
    """λ̂ = nβ·mean(φ) of one component's run, with its MCSE interval.

    Args:
        data: a result of :func:`bayes_susc.sample` (its ``posterior`` group's ``phi``,
            (chain, draw), in nats), or a mapping with ``"phi"`` of that shape.
        nbeta: the run's nβ (dimensionless); default: the value the run recorded.
        confidence: interval coverage, in (0, 1).

    Returns:
        Dataset of scalars: ``llc`` (λ̂, dimensionless), ``se``, ``ci_low``,
        ``ci_high``, ``ess`` (ESS of the mean of φ), ``rhat`` (of φ), ``num_draws``
        (finite draws used). Chains with a non-finite draw (diverged) are left out, as
        in :func:`bayes_susc.estimation.susceptibility.estimate`; with none left every
        value is NaN.

    Raises:
        ValueError: no ``phi`` (chain, draw), no nβ recorded or given, or bad ``nbeta``
            or ``confidence``.
    """
    confidence = check_fraction("confidence", confidence, open_low=True)
    if isinstance(data, dict):
        phi = np.asarray(data.get("phi"), dtype=float)
    else:
        if "posterior" not in group_names(data):
            raise ValueError("data must be a sampling result with a 'posterior' group")
        phi = np.asarray(get_group(data, "posterior")["phi"].values, dtype=float)
        if nbeta is None:
            nbeta = _recorded_nbeta(data)
    if phi.ndim != 2:
        raise ValueError(f"phi must have shape (chain, draw), got {phi.shape}")
    if nbeta is None:
        raise ValueError("nbeta: the run records none; pass nbeta=...")
    nbeta = check_positive("nbeta", nbeta)
    kept = np.isfinite(phi).all(axis=1)
    phi = phi[kept]
    if phi.size < 2:
        values = dict.fromkeys(("llc", "se", "ci_low", "ci_high", "ess", "rhat"), math.nan)
        return xr.Dataset({**values, "num_draws": int(phi.size)}, attrs={"nbeta": nbeta})
    llc = nbeta * float(phi.mean())
    se = nbeta * float(convergence.mcse_mean(phi))
    ess = float(convergence.ess_mean(phi))
    dof = max(ess - 1.0, 1.0)
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    return xr.Dataset(
        {
            "llc": llc,
            "se": se,
            "ci_low": llc - half,
            "ci_high": llc + half,
            "ess": ess,
            "rhat": float(convergence.rhat(phi)),
            "num_draws": int(phi.size),
        },
        attrs={"nbeta": nbeta, "confidence": confidence},
    )

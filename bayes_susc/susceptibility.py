"""Susceptibility point estimates from draws.

χ_i = −Cov(φ, ℓ_i − L_E), pooled over all (chain, draw) pairs with grand means
(DESIGN.md §1). Draws of diverged chains are excluded, never averaged in.
Intervals, convergence and statuses build on this (see the response-matrix module).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from bayes_susc.storage import get_group


def susceptibility(data: Any) -> xr.DataArray:
    """Pooled χ per probe item from one component's sampling run.

    Args:
        data: InferenceData/DataTree from :func:`bayes_susc.sample`.

    Returns:
        ``chi`` over dimension ``probe`` (units of loss², nats² for log-losses), with the
        probe coordinates of the run. Raises if no finite draw is left.
    """
    post = get_group(data, "posterior")
    phi = post["phi"].values  # (chain, draw)
    delta = (post["probe_loss"] - post["eval_loss"]).transpose("chain", "draw", "probe").values
    keep = np.isfinite(phi) & np.isfinite(delta).all(-1)
    if keep.sum() < 2:
        raise ValueError("fewer than two finite draws: every chain diverged or draws are missing")
    phi_k, delta_k = phi[keep], delta[keep]  # (n,), (n, probe)
    phi_c = phi_k - phi_k.mean()
    cov = phi_c @ (delta_k - delta_k.mean(0)) / (phi_k.size - 1)
    return xr.DataArray(
        -cov, dims=("probe",), coords=post["probe_loss"]["probe"].coords, name="chi"
    )

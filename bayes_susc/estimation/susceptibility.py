"""Susceptibilities from draws: point estimates, intervals, convergence, all entries at once.

For a component C with observable φ and a probe item i (DESIGN.md §1)

    χ_i = −Cov_p[ φ , ℓ_i − L_E ]

estimated by pooling every kept (chain, draw) pair with grand means and the ``n − 1``
denominator. A probe *data set* has χ = mean of its items' χ; here the loss differences
ΔL_i = ℓ_i − L_E are averaged over the set's items *before* the covariance, which is
algebraically the same thing, for the estimate and for every bootstrap resample.

Diverged chains (any non-finite draw, or flagged in ``sample_stats.diverged``) are
excluded from every estimate and counted in ``num_diverged_chains``; never averaged in.

Uncertainty (DESIGN.md §4). Draws are autocorrelated, so intervals come from methods
that respect it; every entry of a response matrix is resampled *jointly*: a resample is
a count vector over the N = chain·draw draws, and the resampled χ of all entries comes
from one matrix product (entries × draws) @ (draws × resamples), chunked over entries.
Resampling blocks never cross a chain boundary, but their starts are drawn over *all*
chains, so a resample's count per chain varies: differences between chains (the
spread R-hat looks at) widen the interval, and resample means are pooled like the
estimate's grand means. (Resampling each chain separately, keeping its count fixed,
leaves out the between-chain part; in a coverage study like the one below it gave SEs
≈ 18% too small at 4 × 200 draws, against ≈ 15% with pooled starts.) Methods:

``"ess_t"`` (default)
    SE = MCSE of the mean of the product series (its ESS_mean, Geyer's initial
    monotone sequence, as ArviZ) · n/(n−1), i.e. the ``mcse`` column; t interval and t
    p-value with ν = ESS_mean / (κ̂ − 1) degrees of freedom (at least 2), κ̂ the sample
    kurtosis of the pooled product series. Why: the product series is heavy-tailed
    (on the linear–Gaussian model κ̂ ≈ 30–50, often > 100), so any SE estimate from
    4 × 200 draws is itself noisy (coefficient of variation ≈ 0.4 at ESS ≈ 200: about
    3–5 effective degrees of freedom), and normal quantiles undercover even when the
    variance is unbiased. For i.i.d. draws Var(σ̂²)/σ⁴ ≈ (κ − 1)/n gives the
    Satterthwaite ν = 2n/(κ − 1); with autocorrelation n becomes the ESS, and the
    estimated autocorrelation time adds a comparable second source of noise, hence
    the factor 2 (measured, not derived: 2·ESS/(κ − 1) still covered ≈ 0.925).
``"stationary_bootstrap"``
    Politis & Romano (1994): geometric block lengths of mean b, each block wrapping
    around the end of its own chain; b from the data by the Politis & White (2004) rule
    with the Patton, Politis & White (2009) correction. Percentile interval, SE =
    bootstrap sd.
``"moving_block_bootstrap"``
    Künsch (1989): blocks of fixed length ⌈b_CB⌉ (the same rule's value for the
    circular/moving block bootstrap) inside one chain. Percentile interval, SE =
    bootstrap sd.
``"batch_means"``
    non-overlapping batches within chains (the earliest D mod size draws of each chain
    are dropped), batch-level χ_b = −n/(n−1) · mean of the product series (grand means)
    over the batch; SE = sd(χ_b)/√B, t interval with B − 1 degrees of freedom. Default
    batch size: the rule's b_CB, but at least ⌊√N⌋ (Flegal & Jones).
``"ess"``
    SE = sd(product series) / √ESS_bulk(product series) · n/(n−1); normal interval.
    (ESS_bulk is rank-based; for the heavy-tailed product series it runs above the ESS
    of the mean, so this SE tends to be a little small.)
``"iid_bootstrap"``
    the naive bootstrap (single draws resampled independently), too narrow for
    autocorrelated draws; kept for the coverage comparison.

Coverage (``python -m diagnostics.coverage``, report in diagnostics/reports/coverage/:
200 replications × 8 entries per setting, 4 chains, ESS from < 50 to > 1,000): for
entries with ESS ≥ 100 the default ``ess_t`` covers 0.940 (0.925 for ESS 100–200,
0.951 for 200–400, 0.943 above), the block bootstraps 0.886 (percentile intervals are
too short here: the block-length rule is MSE-optimal for the variance, and the heavy
tails make the SE noisy), batch means 0.912, ``"ess"`` 0.899 and the i.i.d. bootstrap
0.729. The bootstrap remains
available and is what DESIGN.md §4 asks for; it is not the default because it does
not reach nominal coverage at the ESS users typically have. Earlier measurements
(tests/test_susceptibility.py, linear–Gaussian SGLD with the exact chain χ):
at 4 chains × 200 draws with bulk ESS ≈ 235, nominal 95% intervals cover ≈ 0.86
(stationary, moving block), 0.90 (batch means), 0.88 (ESS), 0.58 (iid); at 16 × 200
draws with ESS ≈ 2,600 the stationary bootstrap's 95% interval covers ≈ 0.93 and its
99.9% interval ≈ 0.996. The remaining shortfall at small ESS is the usual bias of block
methods at short chains (lag-window bias ≈ G/b plus mean-centring ≈ 2b/N).

The *product series* of entry i is the per-draw term whose mean is −χ_i (up to the
factor (n−1)/n): s_t = (φ_t − φ̄)(ΔL_{i,t} − ΔL̄_i), or φ_t(ΔL_{i,t} − m_i) for the
renormalized estimator. Its R-hat, bulk/tail ESS and MCSE (:mod:`bayes_susc.estimation.convergence`)
are reported per entry, and the block length rule and the ``"ess"`` method act on it.

Block length. Joint resampling needs one length for all entries: the Politis–White
value is computed for the product series of every entry (of an evenly spaced subset of
at most 512 entries per component, pooled over components in :func:`estimate_many`) and
the median is used, capped at the draws per chain. The rule's sample size is N = chain ·
draw (the resamples pool the chains). Why the product series: the bootstrap is of its
mean, so its autocorrelation is what sets the block length. Why the median: per-series
Politis–White estimates are noisy (the bandwidth m̂ jumps), the median is the usual way
to combine them for a multivariate series, and the bootstrap variance is flat near the
optimum (a factor 2 off the optimal b costs little). Entries that mix much more slowly
than the typical one show a low ESS, which the response matrix's status flags. Pass
``block_length`` to fix it yourself.

p-values are two-sided for χ = 0 from the normal approximation z = χ/SE, for every
method except ``"batch_means"``, which uses the t distribution of its interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from scipy import special, stats

from bayes_susc.errors import DivergenceWarning
from bayes_susc.estimation import convergence
from bayes_susc.storage.draws import get_group, group_names
from bayes_susc.validation import check_finite, check_fraction, check_int

__all__ = [
    "METHODS",
    "estimate",
    "estimate_many",
    "optimal_block_length",
    "pooled_chi",
    "product_series",
    "resample_weights",
    "resampled_chi",
    "susceptibility",
]

#: Interval methods accepted by :func:`estimate` and :func:`estimate_many`.
METHODS = (
    "ess_t",
    "stationary_bootstrap",
    "moving_block_bootstrap",
    "batch_means",
    "ess",
    "iid_bootstrap",
)
_BOOTSTRAPS = ("stationary_bootstrap", "moving_block_bootstrap", "iid_bootstrap")
_RESAMPLE_BLOCK = 50  # resamples per random stream: weights do not depend on chunking
_MAX_ELEMENTS = 2**23  # float64 values per large temporary (64 MiB)
_RULE_ENTRIES = 512  # entries per component the block-length rule looks at
_MIN_EXCESS = 1e-3  # floor on kurtosis − 1 in the ess_t degrees of freedom
_MIN_DOF = 2.0  # floor on the ess_t degrees of freedom (t_2: finite variance)
_BOOT_CHUNK = 1024  # entries per bootstrap product: the (entries, resamples) block stays in cache


# --------------------------------------------------------------------------------------
# Reading draws
# --------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One component's draws: φ (C, D), ΔL (C, D, P) on demand, flags, probe coords."""

    phi: np.ndarray
    # (C, D, P): ΔL itself when eval_loss is None. An array, or an xarray.DataArray that
    # may be backed lazily by a draw store: only the probe items indexed are read.
    probe_loss: Any
    eval_loss: np.ndarray | None  # (C, D)
    flagged: np.ndarray  # (C,) bool, from sample_stats.diverged
    coords: dict[str, np.ndarray]  # coordinates on the probe dimension
    label: str
    chunk: int | None = None  # most probe items read at once (None: by _MAX_ELEMENTS)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.phi.shape, self.probe_loss.shape[-1])

    def blocks(self) -> list[slice]:
        """Probe-item blocks to read one at a time: memory O(C·D·block), whatever P is."""
        return _chunks(self.shape[2], self.phi.size, self.chunk)

    def delta(self, chains: np.ndarray, items: slice | np.ndarray = slice(None)) -> np.ndarray:
        """ΔL = ℓ − L_E for the given chains and probe items, (c, D, p) float64."""
        out = np.asarray(self.probe_loss[:, :, items])
        evals = self.eval_loss
        if not chains.all():
            out = out[chains]
            evals = None if evals is None else evals[chains]
        if evals is not None:
            return out - evals[:, :, None]
        return np.array(out, dtype=float)  # always a copy: callers may work in place

    def diverged(self) -> np.ndarray:
        """(C,) bool: chain flagged, or any non-finite φ or ΔL draw (chunked scan)."""
        bad = self.flagged | ~np.isfinite(self.phi).all(axis=1)
        if self.eval_loss is not None:
            bad |= ~np.isfinite(self.eval_loss).all(axis=1)
        for sl in self.blocks():
            chunk = np.asarray(self.probe_loss[:, :, sl])
            bad |= ~np.isfinite(chunk).all(axis=(1, 2))
        return bad


def _read(data: Any, label: str) -> _Run:
    """Normalise a sampling result, a posterior Dataset or a mapping of arrays."""
    flagged = None
    if isinstance(data, xr.Dataset):
        post = data
    elif isinstance(data, Mapping) and not hasattr(data, "groups"):
        return _read_arrays(data, label)  # (InferenceData is a Mapping of its groups)
    else:
        try:
            names = group_names(data)
        except (AttributeError, TypeError):
            raise TypeError(
                f"{label} must be a sampling result (InferenceData/DataTree), a posterior "
                "xarray.Dataset, or a mapping of arrays {'phi', 'delta_loss'}; got "
                f"{type(data).__name__}"
            ) from None
        post = get_group(data, "posterior")
        if "sample_stats" in names:
            stats_ds = get_group(data, "sample_stats")
            if "diverged" in stats_ds:
                flagged = np.asarray(stats_ds["diverged"].transpose("chain", "draw").values)
                flagged = flagged.astype(bool).any(axis=1)
    missing = [v for v in ("phi", "probe_loss", "eval_loss") if v not in post]
    if "delta_loss" in post:
        missing = [v for v in missing if v == "phi"]
    if missing:
        raise ValueError(
            f"{label}: the posterior lacks variable(s) {missing}; expected phi (chain, "
            "draw) with probe_loss (chain, draw, probe) and eval_loss (chain, draw), "
            "as written by bayes_susc.sample"
        )
    phi = np.asarray(post["phi"].transpose("chain", "draw").values, dtype=float)
    if "delta_loss" in post:
        probe = post["delta_loss"].transpose("chain", "draw", "probe")
        eval_loss = None
    else:
        probe = post["probe_loss"].transpose("chain", "draw", "probe")
        eval_loss = np.asarray(post["eval_loss"].transpose("chain", "draw").values, dtype=float)
    coords = {
        name: np.asarray(c.values) for name, c in probe.coords.items() if c.dims == ("probe",)
    }
    # probe stays a DataArray: a store-backed one is read block by block, never whole.
    run = _Run(phi, probe, eval_loss, _flags(flagged, phi, label), coords, label)
    _check_shapes(run)
    return run


def _read_arrays(data: Mapping[str, Any], label: str) -> _Run:
    if "phi" not in data or not ("delta_loss" in data or "probe_loss" in data):
        raise ValueError(
            f"{label}: a mapping of arrays needs 'phi' (chain, draw) and either "
            "'delta_loss' (chain, draw, probe) or 'probe_loss' with 'eval_loss'; "
            f"got keys {sorted(data)}"
        )
    phi = np.asarray(data["phi"], dtype=float)
    if "delta_loss" in data:
        probe, eval_loss = np.asarray(data["delta_loss"], dtype=float), None
    else:
        if "eval_loss" not in data:
            raise ValueError(f"{label}: 'probe_loss' needs 'eval_loss' (chain, draw) beside it")
        probe = np.asarray(data["probe_loss"], dtype=float)
        eval_loss = np.asarray(data["eval_loss"], dtype=float)
    flagged = data.get("diverged")
    flagged = None if flagged is None else np.asarray(flagged, dtype=bool)
    if flagged is not None and flagged.ndim == 2:
        flagged = flagged.any(axis=1)
    if probe.ndim != 3:
        raise ValueError(
            f"{label}: the loss differences must have shape (chain, draw, probe), got "
            f"shape {probe.shape}"
        )
    coords = {"probe": np.arange(probe.shape[2])}
    run = _Run(phi, probe, eval_loss, _flags(flagged, phi, label), coords, label)
    _check_shapes(run)
    return run


def _flags(flagged: np.ndarray | None, phi: np.ndarray, label: str) -> np.ndarray:
    if phi.ndim != 2:
        raise ValueError(f"{label}: phi must have shape (chain, draw), got shape {phi.shape}")
    if flagged is None:
        return np.zeros(phi.shape[0], dtype=bool)
    if flagged.shape != (phi.shape[0],):
        raise ValueError(
            f"{label}: diverged must have shape (chain,) or (chain, draw) matching phi "
            f"{phi.shape}, got shape {flagged.shape}"
        )
    return flagged


def _check_shapes(run: _Run) -> None:
    c, d = run.phi.shape
    if run.probe_loss.shape[:2] != (c, d):
        raise ValueError(
            f"{run.label}: phi has shape {(c, d)} but the probe losses have (chain, draw) "
            f"shape {run.probe_loss.shape[:2]}; they must match"
        )
    if run.eval_loss is not None and run.eval_loss.shape != (c, d):
        raise ValueError(
            f"{run.label}: eval_loss has shape {run.eval_loss.shape}, expected {(c, d)}"
        )
    if run.probe_loss.shape[2] == 0:
        raise ValueError(f"{run.label}: there are no probe items")


def _diverged_result(num_chains: int, num_entries: int) -> dict[str, Any]:
    """The entries of a component with no usable draws: NaN, every chain diverged."""
    out: dict[str, Any] = {k: np.full(num_entries, np.nan) for k in _VARIABLES}
    out["num_diverged_chains"] = num_chains
    out["num_draws"] = 0
    return out


class _TooFewDraws(ValueError):
    """Fewer than two draws are left once the diverged chains are excluded."""


def _kept(run: _Run) -> tuple[np.ndarray, int]:
    """Chains kept (not diverged) and the number of kept draws; raise if fewer than 2."""
    keep = ~run.diverged()
    n = int(keep.sum()) * run.phi.shape[1]
    if n < 2:
        raise _TooFewDraws(
            f"{run.label}: fewer than two finite draws are left ({n}) after excluding "
            f"{int((~keep).sum())} diverged chain(s) of {keep.size}; rerun with a smaller "
            "step_size or a larger gamma"
        )
    return keep, n


# --------------------------------------------------------------------------------------
# Point estimates and resampled estimates on arrays
# --------------------------------------------------------------------------------------


def _finite_chains(phi: Any, delta_loss: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    phi = np.asarray(phi, dtype=float)
    delta = np.asarray(delta_loss, dtype=float)
    if phi.ndim != 2 or delta.shape[:2] != phi.shape:
        raise ValueError(
            "phi must have shape (chain, draw) and delta_loss (chain, draw, *entries) with "
            f"the same (chain, draw); got {phi.shape} and {delta.shape}"
        )
    flat = delta.reshape(*phi.shape, -1)
    keep = np.isfinite(phi).all(axis=1) & np.isfinite(flat).all(axis=(1, 2))
    if not keep.all():
        warnings.warn(
            f"{int((~keep).sum())} of {keep.size} chain(s) have non-finite draws (diverged) "
            "and are excluded from the estimate",
            DivergenceWarning,
            stacklevel=3,
        )
    if keep.sum() * phi.shape[1] < 2:
        raise ValueError("phi/delta_loss: fewer than two finite draws are left")
    return phi, delta, keep


def _check_means(mean_delta_loss: Any, entries: tuple[int, ...], name: str) -> np.ndarray:
    m = np.asarray(mean_delta_loss, dtype=float)
    if m.shape != entries or not np.isfinite(m).all():
        raise ValueError(
            f"{name} must be a finite array of shape {entries} (one mean of ℓ − L_E per "
            f"entry), got shape {m.shape}"
        )
    return m


def pooled_chi(phi: Any, delta_loss: Any, *, mean_delta_loss: Any = None) -> np.ndarray:
    """χ = −Cov(φ, ΔL) pooled over every (chain, draw), for every entry at once.

    Args:
        phi: φ draws, (chain, draw).
        delta_loss: ΔL = ℓ − L_E draws, (chain, draw, *entries).
        mean_delta_loss: ``None`` for the pooled estimator; per-entry means m of ΔL from
            an unrestricted run (shape ``entries``) for the renormalized one
            (see :func:`estimate`).

    Returns:
        χ, shape ``entries``. Chains with a non-finite draw are excluded (with a
        :class:`~bayes_susc.DivergenceWarning` giving their number).
    """
    phi, delta, keep = _finite_chains(phi, delta_loss)
    entries = delta.shape[2:]
    p = phi[keep].reshape(-1)
    d = delta[keep].reshape(p.size, -1)
    if mean_delta_loss is None:
        return (-((p - p.mean()) @ (d - d.mean(axis=0))) / (p.size - 1)).reshape(entries)
    m = _check_means(mean_delta_loss, entries, "mean_delta_loss").reshape(-1)
    return (-(p @ (d - m)) / (p.size - 1)).reshape(entries)


def resampled_chi(
    phi: Any, delta_loss: Any, weights: Any, *, mean_delta_loss: Any = None
) -> np.ndarray:
    """χ of every resample and entry: ``weights`` (resample, chain, draw) are counts.

    A resample's χ is the estimator applied to the draws repeated as often as their
    count says (with the resample's own means and its own count n* in n* − 1). All
    entries use the same weights: one matrix product, no loop over entries or resamples.

    Returns:
        (resample, *entries); NaN for a resample with fewer than two kept draws. Chains
        with a non-finite draw are excluded, as are their columns of ``weights``.
    """
    phi, delta, keep = _finite_chains(phi, delta_loss)
    w = np.asarray(weights, dtype=float)
    if w.ndim != 3 or w.shape[1:] != phi.shape:
        raise ValueError(
            f"weights must have shape (resample, chain, draw) = (R, {phi.shape[0]}, "
            f"{phi.shape[1]}), got {w.shape}"
        )
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("weights must be finite counts >= 0")
    entries = delta.shape[2:]
    p = phi[keep].reshape(-1)
    d = delta[keep].reshape(p.size, -1)
    m = None
    if mean_delta_loss is not None:
        m = _check_means(mean_delta_loss, entries, "mean_delta_loss").reshape(-1)
    w = w[:, keep].reshape(w.shape[0], -1)
    mean = d.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = _resampled_t(w, p, d - mean, m, mean)
    return out.T.reshape(w.shape[0], *entries)


def _resampled_t(
    w: np.ndarray,
    phi: np.ndarray,
    delta_c: np.ndarray,
    m: np.ndarray | None,
    delta_mean: np.ndarray,
) -> np.ndarray:
    """χ* transposed, (entries, resamples), from counts ``w`` (R, N) and centred ΔL (N, P).

    With n* = Σ_t w_t and φ̄* = Σ_t w_t φ_t / n*, pooled:
    Σ_t w_t(φ_t − φ̄*)(ΔL_t − ΔL̄*) = Σ_t w_t(φ_t − φ̄*)(ΔL_t − ΔL̄): one product with the
    φ-weighted counts w_t(φ_t − φ̄*). Renormalized: Σ_t w_t φ_t(ΔL_t − m) =
    Σ_t w_t φ_t(ΔL_t − ΔL̄) + (ΔL̄ − m) Σ_t w_t φ_t. Both are divided by n* − 1.
    """
    n_star = w.sum(axis=1)
    if m is None:
        phi_c = phi - phi.mean()
        tilde = w * (phi_c[None, :] - ((w @ phi_c) / n_star)[:, None])
        out = delta_c.T @ tilde.T
    else:
        out = delta_c.T @ (w * phi[None, :]).T
        out += (delta_mean - m)[:, None] * (w @ phi)[None, :]
    out /= -(n_star - 1.0)[None, :]
    out[:, n_star < 2] = np.nan
    return out


def product_series(phi: Any, delta_loss: Any, *, mean_delta_loss: Any = None) -> np.ndarray:
    """The per-draw series whose mean is −χ·(n − 1)/n, (chain, draw, *entries).

    Pooled: (φ_t − φ̄)(ΔL_t − ΔL̄) with grand means; renormalized: φ_t(ΔL_t − m).
    Its R-hat, ESS and MCSE say how well χ is estimated; the arrays must be finite.
    """
    phi = np.asarray(phi, dtype=float)
    delta = np.asarray(delta_loss, dtype=float)
    if phi.ndim != 2 or delta.shape[:2] != phi.shape:
        raise ValueError(
            f"phi (chain, draw) and delta_loss (chain, draw, *entries) must match, got "
            f"{phi.shape} and {delta.shape}"
        )
    extra = (slice(None), slice(None)) + (None,) * (delta.ndim - 2)
    if mean_delta_loss is None:
        return (phi - phi.mean())[extra] * (delta - delta.mean(axis=(0, 1)))
    m = _check_means(mean_delta_loss, delta.shape[2:], "mean_delta_loss")
    return phi[extra] * (delta - m)


def susceptibility(data: Any, *, probe_chunk: int | None = None) -> xr.DataArray:
    """Pooled χ per probe item from one component's sampling run.

    Args:
        data: InferenceData/DataTree from :func:`bayes_susc.sample` (or its posterior
            Dataset, or a mapping of arrays as accepted by :func:`estimate`).
        probe_chunk: most probe items whose draws are read at once (see
            :func:`estimate`).

    Returns:
        ``chi`` over dimension ``probe`` (units of loss², nats² for log-losses), with the
        probe coordinates of the run and ``attrs["num_diverged_chains"]``: chains with a
        non-finite draw are excluded, never averaged in. Raises if fewer than two
        finite draws are left. For intervals and convergence use :func:`estimate`.
    """
    run = _read(data, "data")
    run.chunk = _check_probe_chunk(probe_chunk)
    keep, n = _kept(run)
    p = run.phi[keep].reshape(-1)
    p = p - p.mean()
    chi = np.empty(run.shape[2])
    for sl in run.blocks():
        d = run.delta(keep, sl).reshape(n, -1)
        chi[sl] = -(p @ (d - d.mean(axis=0))) / (n - 1)
    out = xr.DataArray(chi, dims=("probe",), coords=_coord_vars(run.coords), name="chi")
    out.attrs["num_diverged_chains"] = int((~keep).sum())
    return out


# --------------------------------------------------------------------------------------
# Block length and resampling weights
# --------------------------------------------------------------------------------------


def optimal_block_length(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Politis–White (2004) block lengths with the Patton–Politis–White (2009) correction.

    Vectorized over entries; chains are pooled: autocovariances are computed within each
    chain (chain mean removed) and averaged over chains, and the sample size in the rule
    is n = chain·draw (blocks stay within chains, so the result is capped at the number
    of draws per chain). Constants follow the authors' code: K_N = max(5, ⌈√log10 n⌉),
    m_max = ⌈√n⌉ + K_N, significance threshold 2√(log10 n / n), flat-top lag window,
    b ≤ ⌈min(3√n, n/3)⌉.

    Args:
        x: series, (chain, draw, *entries).

    Returns:
        (b_stationary, b_circular), each of shape ``entries``: the mean block length of
        the stationary bootstrap and the block length of the circular/moving block
        bootstrap (not rounded), both ≥ 1. A constant series gets 1.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim < 2 or x.shape[1] < 2:
        raise ValueError(f"x must have shape (chain, draw, *entries) with draw >= 2, got {x.shape}")
    c, d = x.shape[:2]
    entries = x.shape[2:]
    y = x.reshape(c, d, -1)
    y = y - y.mean(axis=1, keepdims=True)
    n = c * d
    k_n = max(5, math.ceil(math.sqrt(math.log10(n))))
    m_max = min(math.ceil(math.sqrt(n)) + k_n, d - 1)
    b_max = min(math.ceil(min(3 * math.sqrt(n), n / 3)), d)
    acov = np.stack(
        [np.einsum("cte,cte->e", y[:, : d - k], y[:, k:]) / n for k in range(m_max + 1)]
    )  # (m_max + 1, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = acov[1:] / acov[0]
    small = np.abs(rho) < 2 * math.sqrt(math.log10(n) / n)  # (m_max, E), lag k at row k-1
    # m̂ (1-based, as the authors' code): first lag starting k_n insignificant ones in a row.
    windows = max(m_max - k_n + 1, 0)
    csum = np.concatenate([np.zeros((1, small.shape[1])), np.cumsum(small, axis=0)])
    run_ok = (csum[k_n : k_n + windows] - csum[:windows]) == k_n  # (windows, E)
    first = np.argmax(run_ok, axis=0) + 1 if windows else np.ones(small.shape[1], int)
    found = run_ok.any(axis=0) if windows else np.zeros(small.shape[1], bool)
    significant = ~small
    last_sig = m_max - np.argmax(significant[::-1], axis=0)
    last_sig = np.where(significant.any(axis=0), last_sig, 1)
    m_hat = np.where(found, first, last_sig)
    big_m = np.minimum(2 * m_hat, m_max).astype(float)
    lags = np.arange(m_max + 1)[:, None]
    t = lags / np.maximum(big_m, 1.0)
    lam = np.where(t <= 0.5, 1.0, np.where(t <= 1.0, 2.0 * (1.0 - t), 0.0))
    g_hat = 2.0 * (lam[1:] * lags[1:] * acov[1:]).sum(axis=0)
    spec = acov[0] + 2.0 * (lam[1:] * acov[1:]).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = g_hat**2 / spec**2
    ratio = np.where(np.isfinite(ratio) & (acov[0] > 0), ratio, 0.0)
    # b_SB = (2G²/D_SB)^(1/3) n^(1/3), D_SB = 2g²; b_CB with D_CB = (4/3)g² (PPW 2009).
    b_sb = np.clip(np.cbrt(ratio * n), 1.0, b_max)
    b_cb = np.clip(np.cbrt(1.5 * ratio * n), 1.0, b_max)
    return b_sb.reshape(entries), b_cb.reshape(entries)


def resample_weights(
    method: str,
    num_chains: int,
    num_draws: int,
    *,
    n_resamples: int = 1000,
    block_length: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Count vectors of bootstrap resamples of chain-structured draws, (resample, chain, draw).

    Each resample is N = chain·draw positions made of blocks that never cross a chain
    boundary, each block starting at a position drawn uniformly over *all* chains (so a
    resample's count per chain varies and differences between chains enter the spread):

    - ``"stationary_bootstrap"``: Politis & Romano (1994); geometric block lengths of mean
      ``block_length``, each block wrapping around the end of its own chain;
    - ``"moving_block_bootstrap"``: Künsch (1989); blocks of ``round(block_length)`` draws
      lying inside one chain, ⌈N / length⌉ of them, truncated to N;
    - ``"iid_bootstrap"``: N single draws (``block_length`` ignored).

    Resample r depends only on (method, shape, block length, seed, r), so every component
    and entry estimated with the same arguments shares it.
    """
    if method not in _BOOTSTRAPS:
        raise ValueError(f"method must be one of {_BOOTSTRAPS}, got {method!r}")
    n_resamples = check_int("n_resamples", n_resamples, minimum=1)
    num_chains = check_int("num_chains", num_chains, minimum=1)
    num_draws = check_int("num_draws", num_draws, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if method == "iid_bootstrap":
        b = 1.0
    else:
        if block_length is None:
            raise ValueError(f"block_length must be given for {method!r}")
        b = _check_block_length(block_length, num_draws)
    return _weights(method, num_chains, num_draws, b, seed, 0, n_resamples)


def _weights(method: str, c: int, d: int, b: float, seed: int, start: int, stop: int):
    """Resamples ``start``..``stop``-1 as float counts (R, C, D)."""
    blocks = range(start // _RESAMPLE_BLOCK, (stop - 1) // _RESAMPLE_BLOCK + 1)
    parts = [_weights_block(method, c, d, b, seed, k) for k in blocks]
    first = blocks[0] * _RESAMPLE_BLOCK
    return np.concatenate(parts)[start - first : stop - first]


def _weights_block(method: str, c: int, d: int, b: float, seed: int, block: int) -> np.ndarray:
    """``_RESAMPLE_BLOCK`` resamples from their own random stream, counts (r, C, D)."""
    r, n = _RESAMPLE_BLOCK, c * d
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(block,)))
    if method == "iid_bootstrap":
        pos = rng.integers(0, n, size=(r, n))
    elif method == "stationary_bootstrap":
        fresh = rng.random((r, n)) < 1.0 / b
        fresh[:, 0] = True
        starts = rng.integers(0, n, size=(r, n))  # global position chain·D + offset
        t = np.arange(n)
        last = np.maximum.accumulate(np.where(fresh, t, 0), axis=1)
        first = np.take_along_axis(starts, last, axis=1)
        pos = first - first % d + (first % d + t - last) % d  # wrap inside the chain
    else:  # moving block bootstrap
        length = int(round(b))
        per_chain = d - length + 1
        k = -(-n // length)
        u = rng.integers(0, c * per_chain, size=(r, k))
        first = (u // per_chain) * d + u % per_chain
        pos = (first[:, :, None] + np.arange(length)).reshape(r, k * length)[:, :n]
    flat = (np.arange(r)[:, None] * n + pos).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, c, d).astype(float)


def _check_block_length(block_length: Any, num_draws: int) -> float:
    b = check_finite("block_length", block_length)
    if not 1.0 <= b <= num_draws:
        raise ValueError(
            f"block_length must lie in [1, draws per chain = {num_draws}], got {block_length!r}"
        )
    return b


# --------------------------------------------------------------------------------------
# Probe data sets
# --------------------------------------------------------------------------------------


def _grouping(
    groups: Any, coords: dict[str, np.ndarray], num_probe: int
) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """Averaging matrix A (P, G) and the new probe coordinates; (None, coords) for items."""
    if groups is None:
        return None, coords
    if isinstance(groups, str):
        if groups not in coords:
            raise ValueError(
                f"groups={groups!r} is not a probe coordinate; available: {sorted(coords)}"
            )
        labels, name = coords[groups], groups
    elif isinstance(groups, Mapping):
        names = list(groups)
        if not names:
            raise ValueError("groups must name at least one probe data set, got an empty mapping")
        a = np.zeros((num_probe, len(names)))
        for j, key in enumerate(names):
            members = np.asarray(groups[key])
            if members.dtype == bool:
                if members.shape != (num_probe,):
                    raise ValueError(
                        f"groups[{key!r}]: a boolean mask must have shape ({num_probe},), "
                        f"got {members.shape}"
                    )
                members = np.flatnonzero(members)
            if members.ndim != 1 or members.size == 0 or members.dtype.kind not in "iu":
                raise ValueError(
                    f"groups[{key!r}] must be a non-empty sequence of probe indices or a "
                    f"boolean mask, got {groups[key]!r}"
                )
            if members.min() < 0 or members.max() >= num_probe:
                raise ValueError(f"groups[{key!r}]: probe indices must lie in [0, {num_probe})")
            members = np.unique(members)
            a[members, j] = 1.0 / members.size
        sizes = np.count_nonzero(a, axis=0)
        return a, {"probe": np.asarray(names), "group": np.asarray(names), "num_items": sizes}
    else:
        labels, name = np.asarray(groups), "group"
        if labels.shape != (num_probe,):
            raise ValueError(
                f"groups as labels must have one label per probe item ({num_probe}), got "
                f"shape {labels.shape}"
            )
    uniq, inverse = np.unique(labels, return_inverse=True)
    a = np.zeros((num_probe, uniq.size))
    a[np.arange(num_probe), inverse.ravel()] = 1.0
    sizes = a.sum(axis=0).astype(int)
    a /= sizes
    return a, {"probe": uniq, name: uniq, "num_items": sizes}


def _coord_vars(coords: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    return {k: ("probe", v) for k, v in coords.items()}


# --------------------------------------------------------------------------------------
# Estimation
# --------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A component's kept draws, grouped: φ (N,), ΔL (N, G) as (c, D, G), bookkeeping."""

    keep: np.ndarray
    n: int
    phi: np.ndarray  # (c_kept, D)
    delta: np.ndarray | None  # (c_kept, D, G) when grouped, else read per chunk
    run: _Run
    group: np.ndarray | None

    @property
    def most(self) -> int | None:
        """Most entries per block: the run's probe_chunk, unless ΔL is grouped in memory."""
        return self.run.chunk if self.delta is None else None

    def delta_chunk(self, items: slice) -> np.ndarray:
        if self.delta is not None:
            return self.delta[:, :, items].copy()
        return self.run.delta(self.keep, items)


def _prepare(run: _Run, group: np.ndarray | None) -> _Prepared:
    keep, n = _kept(run)
    phi = run.phi[keep]
    delta = None
    if group is not None:
        # (c, D, P) @ (P, G): ΔL averaged over each set, summed over blocks of items.
        blocks = run.blocks()
        delta = run.delta(keep, blocks[0]) @ group[blocks[0]]
        for sl in blocks[1:]:
            delta += run.delta(keep, sl) @ group[sl]
    return _Prepared(keep, n, phi, delta, run, group)


def _unrestricted_means(source: Any, num_probe: int, chunk: int | None = None) -> np.ndarray:
    """Per-item means of ℓ − L_E from an unrestricted run or a given array, (P,)."""
    if isinstance(source, (np.ndarray, list, tuple)) or np.isscalar(source):
        m = np.asarray(source, dtype=float)
    else:
        run = _read(source, "renormalized_from")
        run.chunk = chunk
        keep, n = _kept(run)
        m = np.concatenate([run.delta(keep, sl).reshape(n, -1).mean(axis=0) for sl in run.blocks()])
    if m.shape != (num_probe,) or not np.isfinite(m).all():
        raise ValueError(
            f"renormalized_from must give one finite mean of ℓ_i − L_E per probe item "
            f"({num_probe}), got shape {m.shape}"
        )
    return m


def validate_settings(method: Any, confidence: Any, n_resamples: Any, seed: Any) -> tuple:
    """Check the interval settings of :func:`susceptibility` before any estimation.

    Returns ``(method, confidence, n_resamples, seed)`` validated (confidence a fraction in
    (0, 1), n_resamples >= 1, seed >= 0); raises ValueError or TypeError naming the
    argument otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    confidence = check_fraction("confidence", confidence, open_low=True)
    n_resamples = check_int("n_resamples", n_resamples, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    return method, confidence, n_resamples, seed


def _check_probe_chunk(probe_chunk: Any) -> int | None:
    return None if probe_chunk is None else check_int("probe_chunk", probe_chunk, minimum=1)


def _chunks(total: int, width: int, most: int | None = None) -> list[slice]:
    step = max(1, _MAX_ELEMENTS // max(1, width))
    step = step if most is None else min(step, most)
    return [slice(s, min(s + step, total)) for s in range(0, total, step)]


def _first_pass(
    prep: _Prepared, num_entries: int, m: np.ndarray | None, want_rule: bool
) -> dict[str, np.ndarray]:
    """Point estimate, convergence of the product series, ESS-based SE, block-length rule."""
    n = prep.n
    scale = n / (n - 1)
    keys = ("chi", "rhat", "ess_bulk", "ess_tail", "ess_mean", "mcse")
    out = {k: np.empty(num_entries) for k in keys}
    out["sd"] = np.empty(num_entries)
    out["kurtosis"] = np.empty(num_entries)
    rule_at = np.linspace(0, num_entries - 1, min(num_entries, _RULE_ENTRIES))
    rule_at = np.unique(rule_at.astype(int))
    rule_sb, rule_cb = [], []
    phi = prep.phi
    for sl in _chunks(num_entries, n, prep.most):
        delta = prep.delta_chunk(sl)
        if m is None:
            s = (phi - phi.mean())[:, :, None] * (delta - delta.mean(axis=(0, 1)))
        else:
            s = phi[:, :, None] * (delta - m[sl])
        out["chi"][sl] = -s.sum(axis=(0, 1)) / (n - 1)
        flat = s.reshape(n, -1)
        out["sd"][sl] = flat.std(axis=0, ddof=1) * scale
        dev = flat - flat.mean(axis=0)
        m2 = np.mean(dev**2, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["kurtosis"][sl] = np.mean(dev**4, axis=0) / m2**2
        summ = convergence._compute(s, ("rhat", "ess_bulk", "ess_tail", "ess_mean", "mcse_mean"))
        out["rhat"][sl] = summ["rhat"]
        out["ess_bulk"][sl] = summ["ess_bulk"]
        out["ess_tail"][sl] = summ["ess_tail"]
        out["ess_mean"][sl] = summ["ess_mean"]
        out["mcse"][sl] = summ["mcse_mean"] * scale
        if want_rule:
            here = rule_at[(rule_at >= sl.start) & (rule_at < sl.stop)] - sl.start
            if here.size and s.shape[1] >= 2:
                b_sb, b_cb = optimal_block_length(s[:, :, here])
                rule_sb.append(b_sb)
                rule_cb.append(b_cb)
    if want_rule:
        out["rule_sb"] = np.concatenate(rule_sb) if rule_sb else np.ones(1)
        out["rule_cb"] = np.concatenate(rule_cb) if rule_cb else np.ones(1)
    return out


def _bootstrap(
    preps: list[_Prepared],
    results: list[dict[str, np.ndarray]],
    num_entries: int,
    method: str,
    b: float,
    n_resamples: int,
    seed: int,
    confidence: float,
    m: np.ndarray | None,
) -> None:
    """Joint resampling: the same counts for every component and entry.

    A component with diverged chains uses the shared counts of its kept chains (its
    resample size n* then varies; resamples with n* < 2 are dropped for it).
    """
    c, d = preps[0].run.phi.shape
    alpha = 1.0 - confidence
    # Resample spans sized to bound memory; cached when they all fit (the usual case).
    per = max(_RESAMPLE_BLOCK, (_MAX_ELEMENTS // (c * d)) // _RESAMPLE_BLOCK * _RESAMPLE_BLOCK)
    spans = [(s, min(s + per, n_resamples)) for s in range(0, n_resamples, per)]
    cache = {sp: _weights(method, c, d, b, seed, *sp) for sp in spans} if len(spans) == 1 else {}
    for prep, res in zip(preps, results):
        n = prep.n
        phi = prep.phi.reshape(-1)
        tilde: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        most = _BOOT_CHUNK if prep.most is None else min(_BOOT_CHUNK, prep.most)
        for sl in _chunks(num_entries, max(n, n_resamples), most):
            delta = prep.delta_chunk(sl).reshape(n, -1)
            mean = delta.mean(axis=0)
            delta -= mean
            star = np.empty((delta.shape[1], n_resamples))
            for sp in spans:
                if sp not in tilde:  # weighted counts, reused over entry chunks
                    w = cache.get(sp)
                    if w is None:
                        w = _weights(method, c, d, b, seed, *sp)
                    if not prep.keep.all():
                        w = w[:, prep.keep]
                    w = w.reshape(sp[1] - sp[0], n)
                    n_star = w.sum(axis=1)
                    if m is None:
                        phi_c = phi - phi.mean()
                        weighted = w * (phi_c[None, :] - ((w @ phi_c) / n_star)[:, None])
                    else:
                        weighted = w * phi[None, :]
                    tilde[sp] = (weighted, w @ phi, n_star)
                weighted, w_phi, n_star = tilde[sp]
                part = star[:, sp[0] : sp[1]]
                if len(spans) == 1:
                    np.matmul(delta.T, weighted.T, out=star)
                else:
                    part[...] = delta.T @ weighted.T
                if m is not None:
                    part += (mean - m[sl])[:, None] * w_phi[None, :]
                with np.errstate(divide="ignore", invalid="ignore"):
                    part /= -(n_star - 1.0)[None, :]
            valid = np.concatenate([tilde[sp][2] for sp in spans]) >= 2
            if not valid.all():
                star = star[:, valid]
            if star.shape[1] > 1:
                res["se"][sl] = star.std(axis=1, ddof=1)
                star.sort(axis=1)
                res["ci_low"][sl], res["ci_high"][sl] = _sorted_quantiles(
                    star, (alpha / 2, 1 - alpha / 2)
                )


def _sorted_quantiles(sorted_rows: np.ndarray, probs: Sequence[float]) -> list[np.ndarray]:
    """Quantiles (numpy's default 'linear' rule) of rows already sorted along axis 1."""
    r = sorted_rows.shape[1]
    out = []
    for p in probs:
        pos = p * (r - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, r - 1)
        frac = pos - lo
        out.append(sorted_rows[:, lo] * (1.0 - frac) + sorted_rows[:, hi] * frac)
    return out


def _batch_means(
    prep: _Prepared, res: dict[str, np.ndarray], num_entries: int, size: int, m, confidence
) -> int:
    n = prep.n
    c, d = prep.phi.shape
    per_chain = d // size
    num_batches = c * per_chain
    if num_batches < 2:
        raise ValueError(
            f"block_length: batch size {size} leaves {num_batches} batch(es) in {c} kept "
            f"chain(s) of {d} draws; batch means needs at least 2 (use a smaller block_length)"
        )
    skip = d - per_chain * size  # the earliest draws of each chain are dropped
    phi = prep.phi
    tq = stats.t.ppf(0.5 + confidence / 2, num_batches - 1)
    for sl in _chunks(num_entries, n, prep.most):
        delta = prep.delta_chunk(sl)
        if m is None:
            s = (phi - phi.mean())[:, :, None] * (delta - delta.mean(axis=(0, 1)))
        else:
            s = phi[:, :, None] * (delta - m[sl])
        batch = s[:, skip:].reshape(c, per_chain, size, -1).mean(axis=2)
        chi_b = -batch.reshape(num_batches, -1) * n / (n - 1)
        se = chi_b.std(axis=0, ddof=1) / math.sqrt(num_batches)
        res["se"][sl] = se
        res["ci_low"][sl] = res["chi"][sl] - tq * se
        res["ci_high"][sl] = res["chi"][sl] + tq * se
    return num_batches


def _estimate_runs(
    runs: list[_Run],
    method: str,
    confidence: float,
    n_resamples: int,
    block_length: Any,
    seed: int,
    renormalized_from: Any,
    groups: Any,
    probe_chunk: int | None = None,
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any], dict[str, np.ndarray]]:
    for run in runs:
        run.chunk = probe_chunk
    first = runs[0]
    c, d, num_probe = first.shape
    # Bootstraps resample every run at the same draw positions and batch means cut them
    # into the same batches; the ESS intervals treat each run on its own, so runs to a
    # convergence target, extended to different lengths, are estimated side by side.
    joint = method in _BOOTSTRAPS or method == "batch_means"
    for run in runs[1:]:
        if joint and run.shape[:2] != (c, d):
            raise ValueError(
                f"{run.label} has (chain, draw) = {run.shape[:2]} but {first.label} has "
                f"{(c, d)}; joint resampling ({method}) needs every run to have the same "
                "shape (the ESS methods do not)"
            )
        if run.shape[2] != num_probe:
            raise ValueError(
                f"{run.label} has {run.shape[2]} probe items but {first.label} has "
                f"{num_probe}; all runs must share the same probe items"
            )
        for name, values in first.coords.items():
            other = run.coords.get(name)
            if other is not None and not np.array_equal(other, values):
                raise ValueError(
                    f"{run.label}: probe coordinate {name!r} differs from {first.label}'s; "
                    "all runs must share the same probe items"
                )
    group, coords = _grouping(groups, first.coords, num_probe)
    m = None
    if renormalized_from is not None:
        m = _unrestricted_means(renormalized_from, num_probe, probe_chunk)
        if group is not None:
            m = m @ group
    fixed = None if block_length is None else _check_block_length(block_length, d)
    num_entries = num_probe if group is None else group.shape[1]

    want_rule = fixed is None and method in ("stationary_bootstrap", "moving_block_bootstrap")
    want_rule |= fixed is None and method == "batch_means"
    preps, results, lost = [], [], []
    for i, run in enumerate(runs):
        try:
            prep = _prepare(run, group)
        except _TooFewDraws:
            # A component whose chains all diverged has nothing to estimate from: with
            # others beside it, its column is NaN with status "diverged" and the others
            # are estimated as if it were absent.
            if len(runs) == 1:
                raise
            lost.append(i)
            continue
        res = _first_pass(prep, num_entries, m, want_rule)
        for key in ("se", "ci_low", "ci_high"):
            res[key] = np.full(num_entries, np.nan)
        preps.append(prep)
        results.append(res)
    if not preps:
        _kept(runs[0])  # raises, naming the first run
    if lost:
        warnings.warn(
            f"{[runs[i].label for i in lost]}: fewer than two finite draws are left after "
            "excluding diverged chains; their columns are NaN with status 'diverged' (rerun "
            "them with a smaller step_size or a larger gamma)",
            DivergenceWarning,
            stacklevel=3,
        )

    info: dict[str, Any] = {"num_batches": None}
    if method == "ess_t":
        b = np.nan
        for res in results:
            # SE: MCSE of the mean of the product series (ESS_mean, Geyer), in χ units.
            res["se"] = res["mcse"].copy()
            with np.errstate(divide="ignore", invalid="ignore"):
                dof = res["ess_mean"] / np.maximum(res["kurtosis"] - 1.0, _MIN_EXCESS)
            res["dof"] = np.where(np.isfinite(dof), np.maximum(dof, _MIN_DOF), _MIN_DOF)
            tq = stats.t.ppf(0.5 + confidence / 2, res["dof"])
            res["ci_low"] = res["chi"] - tq * res["se"]
            res["ci_high"] = res["chi"] + tq * res["se"]
    elif method == "ess":
        b = np.nan
        z = special.ndtri(0.5 + confidence / 2)
        for res in results:
            res["se"] = res["sd"] / np.sqrt(res["ess_bulk"])
            res["ci_low"] = res["chi"] - z * res["se"]
            res["ci_high"] = res["chi"] + z * res["se"]
    elif method == "batch_means":
        if fixed is None:
            rule = np.median(np.concatenate([r["rule_cb"] for r in results]))
            # At least √N draws per batch (Flegal & Jones' b = ⌊√n⌋), so a batch outlasts
            # the autocorrelation even when the MSE-optimal block is short.
            size = min(max(math.ceil(rule), math.isqrt(c * d)), d)
        else:
            size = math.ceil(fixed)
        b = float(size)
        for prep, res in zip(preps, results):
            info["num_batches"] = _batch_means(prep, res, num_entries, size, m, confidence)
    else:
        if method == "iid_bootstrap":
            b = 1.0
        elif fixed is not None:
            b = fixed if method == "stationary_bootstrap" else float(round(fixed))
        else:
            key = "rule_sb" if method == "stationary_bootstrap" else "rule_cb"
            b = float(np.median(np.concatenate([r[key] for r in results])))
            if method == "moving_block_bootstrap":
                b = float(min(math.ceil(b), d))  # authors' advice: round up
        _bootstrap(preps, results, num_entries, method, b, n_resamples, seed, confidence, m)

    for prep, res in zip(preps, results):
        chi, se = res["chi"], res["se"]
        with np.errstate(divide="ignore", invalid="ignore"):
            zval = np.abs(chi) / se
        if method == "batch_means":
            p = 2.0 * stats.t.sf(zval, info["num_batches"] - 1)
        elif method == "ess_t":
            p = 2.0 * stats.t.sf(zval, res["dof"])
        else:
            p = special.erfc(zval / math.sqrt(2.0))
        res["p_value"] = np.where((se == 0) & (chi == 0), 1.0, p)
        res["num_diverged_chains"] = int((~prep.keep).sum())
        res["num_draws"] = prep.n
    info["block_length"] = b
    info["estimator"] = "pooled" if m is None else "renormalized"
    for i in lost:
        results.insert(i, _diverged_result(runs[i].phi.shape[0], num_entries))
    return results, info, coords


_VARIABLES = ("chi", "se", "ci_low", "ci_high", "p_value", "rhat", "ess_bulk", "ess_tail", "mcse")
_DESCRIPTIONS = {
    "chi": "susceptibility -Cov(phi, l_i - L_E) (loss units squared)",
    "se": "standard error of chi from the interval method",
    "ci_low": "lower end of the confidence interval",
    "ci_high": "upper end of the confidence interval",
    "p_value": "two-sided p-value for chi = 0 (normal approximation chi/se; t for batch_means)",
    "rhat": "rank-normalized split R-hat of the product series",
    "ess_bulk": "bulk ESS of the product series",
    "ess_tail": "tail ESS of the product series",
    "mcse": "MCSE of the mean of the product series, in units of chi",
    "num_diverged_chains": "chains excluded from every estimate (non-finite draws or flagged)",
    "num_draws": "kept draws pooled in the estimate",
    "block_length": "mean block length (stationary), block length (moving), batch size "
    "(batch means), 1 (iid); NaN for the ESS method",
}


def _attrs(method, confidence, n_resamples, seed, info, c, d) -> dict[str, Any]:
    return {
        "method": method,
        "confidence": confidence,
        "n_resamples": n_resamples if method in _BOOTSTRAPS else 0,
        "seed": seed,
        "estimator": info["estimator"],
        "num_chains": c,
        "num_draws_per_chain": d,
        "num_batches": -1 if info["num_batches"] is None else info["num_batches"],
        "block_length_rule": "median over entries of the Politis-White (2004) value with the "
        "Patton-Politis-White (2009) correction, for the product series",
        "p_value_method": "t (batch means)" if method == "batch_means" else "normal",
    }


def estimate(
    data: Any,
    *,
    method: str = "ess_t",
    confidence: float = 0.95,
    n_resamples: int = 1000,
    block_length: float | None = None,
    seed: int = 0,
    renormalized_from: Any = None,
    groups: Any = None,
    probe_chunk: int | None = None,
) -> xr.Dataset:
    """χ with an autocorrelation-aware interval, p-value and convergence per probe entry.

    Args:
        data: one component's draws: InferenceData/DataTree from :func:`bayes_susc.sample`,
            its posterior ``xarray.Dataset``, or a mapping of arrays ``{"phi": (chain,
            draw), "delta_loss": (chain, draw, probe)}`` (or ``"probe_loss"`` and
            ``"eval_loss"`` instead of ``"delta_loss"``; optional ``"diverged"``).
        method: one of :data:`METHODS` (see the module docstring).
        confidence: interval level in (0, 1).
        n_resamples: bootstrap resamples (bootstrap methods only), >= 1.
        block_length: mean block length (stationary), block length (moving block) or
            batch size (batch means); ``None`` chooses it from the data (Politis–White
            rule, median over entries; for batch means at least ⌊√N⌋, N = chain·draw).
        seed: seed of the resampling; the resamples depend only on (method, chains,
            draws, block length, seed).
        renormalized_from: opt-in *renormalized* estimator (see below): a sampling result
            of an unrestricted run, or the array of per-item means of ℓ_i − L_E, (probe,).
        groups: probe data sets: a probe coordinate name (e.g. ``"dataset"``), one label
            per probe item, or a mapping ``name -> item indices (or boolean mask)``.
            Each set's χ is the mean of its items' χ, exactly.
        probe_chunk: most probe items whose draws are held in memory at once; ``None``
            chooses blocks of at most 2²³ values (chain·draw·items). A run streamed to a
            store (``sample(..., store=...)``) is read block by block, so memory is
            O(chain·draw·probe_chunk) however many probe items there are. Results do
            not depend on it (up to float rounding).

    Returns:
        Dataset over ``probe`` (the data sets when ``groups`` is given: ``probe`` then
        holds the set names, with ``num_items``) with ``chi``, ``se``, ``ci_low``,
        ``ci_high``, ``p_value``, ``rhat``, ``ess_bulk``, ``ess_tail``, ``mcse`` (of the
        product series, in χ units), scalars ``num_diverged_chains``, ``num_draws``,
        ``block_length``, and attrs ``method``, ``confidence``, ``n_resamples``, ``seed``,
        ``estimator``. Probe coordinates are kept.

    The renormalized estimator (the published two-run form). Baker et al. (2025) write
    the component observable with a delta function, φ_C = δ(u − u*)[L(w) − L(w*)], and
    the covariance under the *unrestricted* posterior; dropping the normalising
    constant of the delta function leaves

        χ_i = −E_C[ φ (ΔL_i − E_full[ΔL_i]) ],

    a mean over this (component-restricted) run with the mean of ΔL_i = ℓ_i − L_E taken
    from a separate unrestricted run. It is estimated by
    −Σ_t φ_t(ΔL_{i,t} − m_i)/(n − 1), m_i from ``renormalized_from``, and differs from the
    pooled χ by −n/(n − 1)·φ̄·(ΔL̄_i − m_i), the mean of φ times the shift of item i's mean
    between the two runs; with m_i equal to this run's own mean ΔL̄_i the two coincide.
    Use it to compare numbers with tools that report this form (devinterp-style
    outputs), not as the default: it mixes two runs. (φ is *not* centred: with
    φ − φ̄ the m_i would cancel identically.) The divisor n − 1 keeps it equal to the
    pooled estimator in that case; the published form divides by n (a factor
    (n − 1)/n, e.g. 0.99875 at 4 × 200 draws). m is held fixed: the interval does not
    include the unrestricted run's Monte Carlo error.

    Raises:
        ValueError: an argument is out of range (naming it), shapes do not match, or
            fewer than two finite draws are left after excluding diverged chains.
    """
    method, confidence, n_resamples, seed = validate_settings(method, confidence, n_resamples, seed)
    probe_chunk = _check_probe_chunk(probe_chunk)
    run = _read(data, "data")
    results, info, coords = _estimate_runs(
        [run],
        method,
        confidence,
        n_resamples,
        block_length,
        seed,
        renormalized_from,
        groups,
        probe_chunk,
    )
    res = results[0]
    c, d, _ = run.shape
    ds = xr.Dataset(
        {k: ("probe", res[k]) for k in _VARIABLES},
        coords=_coord_vars(coords),
        attrs=_attrs(method, confidence, n_resamples, seed, info, c, d),
    )
    ds["num_diverged_chains"] = ((), res["num_diverged_chains"])
    ds["num_draws"] = ((), res["num_draws"])
    ds["block_length"] = ((), info["block_length"])
    return _describe(ds)


def estimate_many(
    runs: Mapping[str, Any],
    *,
    method: str = "ess_t",
    confidence: float = 0.95,
    n_resamples: int = 1000,
    block_length: float | None = None,
    seed: int = 0,
    renormalized_from: Any = None,
    groups: Any = None,
    probe_chunk: int | None = None,
) -> xr.Dataset:
    """:func:`estimate` for many components at once, resampled jointly: a response matrix.

    Every component and every entry uses the same resampled draw positions (the same
    count vectors per chain), so resampled χ of different components are paired. The
    bootstraps and batch means need every run to have the same (chain, draw) shape; the
    ESS methods (``ess_t``, ``ess``) take runs of different lengths (e.g. extended to a
    convergence target; the attrs' ``num_draws_per_chain`` is then the longest, and
    ``num_draws`` says each component's). A component's diverged chains
    are dropped from its own estimate (its columns of the shared counts are unused).
    The data-driven block length is the median over all components' entries.

    Args:
        runs: component name → that component's draws (as ``data`` of :func:`estimate`);
            all runs must share the same probe items.
        renormalized_from: one unrestricted run (or per-item means) shared by all
            components; see :func:`estimate`.

    The other arguments (``method``, ``confidence``, ``n_resamples``, ``block_length``,
    ``seed``, ``groups``, ``probe_chunk``) are as for :func:`estimate`; store-backed
    runs are read one component and one probe block at a time.

    Returns:
        Dataset over (``probe``, ``component``) with the variables of :func:`estimate`;
        ``num_diverged_chains`` and ``num_draws`` over ``component``.

    Raises:
        ValueError: no runs, different (chain, draw) shapes (bootstraps and batch means)
            or probe items, or any
            :func:`estimate` error.
    """
    method, confidence, n_resamples, seed = validate_settings(method, confidence, n_resamples, seed)
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(
            "runs must be a non-empty mapping of component name -> sampling result, got "
            f"{type(runs).__name__ if not isinstance(runs, Mapping) else 'an empty mapping'}"
        )
    probe_chunk = _check_probe_chunk(probe_chunk)
    names = [str(k) for k in runs]
    read = [_read(v, f"runs[{k!r}]") for k, v in runs.items()]
    results, info, coords = _estimate_runs(
        read,
        method,
        confidence,
        n_resamples,
        block_length,
        seed,
        renormalized_from,
        groups,
        probe_chunk,
    )
    c = read[0].shape[0]
    d = max(r.shape[1] for r in read)
    data_vars = {
        k: (("probe", "component"), np.stack([r[k] for r in results], axis=1)) for k in _VARIABLES
    }
    data_vars["num_diverged_chains"] = (
        ("component",),
        np.array([r["num_diverged_chains"] for r in results]),
    )
    data_vars["num_draws"] = (("component",), np.array([r["num_draws"] for r in results]))
    data_vars["block_length"] = ((), info["block_length"])
    ds = xr.Dataset(
        data_vars,
        coords={**_coord_vars(coords), "component": ("component", np.asarray(names))},
        attrs=_attrs(method, confidence, n_resamples, seed, info, c, d),
    )
    return _describe(ds)


def _describe(ds: xr.Dataset) -> xr.Dataset:
    for name, text in _DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["description"] = text
    return ds

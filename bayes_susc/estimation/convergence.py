"""Convergence diagnostics for many series at once: R-hat, ESS and MCSE as array programs.

A response matrix has 10⁴–10⁶ entries, each a set of MCMC chains; looping
``arviz.rhat`` over them takes minutes. The functions here compute the same numbers
as ArviZ 0.23 (``az.rhat(method="rank")``, ``az.ess(method="bulk" | "tail" | "mean")``,
``az.mcse(method="mean" | "sd")``, all with ``relative=False``) for every entry in one
vectorized pass: split chains, rank normalisation, FFT autocovariance and Geyer's
initial-monotone-sequence truncation all act on an ``(entry, chain, draw)`` block.

Shapes
------
Every function takes ``x`` of shape ``(chain, draw, *entries)`` (any number of
trailing entry dimensions, including none) and returns an array of shape
``entries``; with no entry dimensions it returns a NumPy float scalar.

Edge cases follow ArviZ entry by entry:

- an entry containing NaN gives NaN for every statistic (other entries unaffected);
- fewer than 4 draws gives NaN everywhere; a single chain gives NaN R-hat (ESS and
  MCSE still work, on the two halves of the chain);
- a constant entry gives NaN R-hat and ``mcse_sd``, but ESS equal to the number of
  (split) draws and ``mcse_mean`` 0, because ArviZ's ``_ess`` returns the sample size
  when the range is below ``np.finfo(float).resolution``;
- an odd number of draws drops the middle draw when splitting chains;
- ``inf`` is ranked like any value (finite R-hat and rank ESS) and makes the
  moment-based ESS and MCSE NaN.

Precision: everything is computed in float64, except that the draws are folded about
their median in the input's floating dtype, as ArviZ does (for float32 draws this
rounding decides ties in the tail R-hat). For float32 input R-hat and ESS therefore
equal ArviZ's to float64 rounding, while ``mcse_mean`` and ``mcse_sd`` are more
accurate than ArviZ's, which accumulates them in float32 (they differ by about 1e-7
and 1e-6 relative).

References
----------
Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021). Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC. Bayesian Analysis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike
from scipy import special
from scipy.fft import next_fast_len

__all__ = [
    "ess_bulk",
    "ess_mean",
    "ess_tail",
    "mcse_mean",
    "mcse_sd",
    "rhat",
    "summary",
]

MIN_DRAWS = 4
"""Fewer draws per chain than this gives NaN for every statistic (as ArviZ)."""

TAIL_PROBS = (0.05, 0.95)
"""Quantiles whose indicator ESS is minimised by :func:`ess_tail`."""

_BLOM_OFFSET = 3 / 8
_CONSTANT_RANGE = np.finfo(float).resolution
_CHUNK_ELEMENTS = 2**16  # float64 values per block of entries: intermediates stay in L2


# ---------------------------------------------------------------------------
# Array kernels. ``y`` is always (entry, chain, draw), C-contiguous along draw.
# ---------------------------------------------------------------------------


def _split_chains(y: np.ndarray) -> np.ndarray:
    """(E, C, D) -> (E, 2C, D // 2): first and last halves, middle draw dropped if D odd."""
    n_draw = y.shape[2]
    half = n_draw // 2
    return np.concatenate([y[:, :, :half], y[:, :, n_draw - half :]], axis=1)


def _sort_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of (E, N): (argsort order, sorted values)."""
    order = np.argsort(a, axis=-1)
    return order, np.take_along_axis(a, order, axis=-1)


def _z_scale_sorted(order: np.ndarray, sorted_a: np.ndarray) -> np.ndarray:
    """Rank-normalise each row of (E, N), given its sort; returns (E, N) in input order.

    Average ranks for ties (as ``scipy.stats.rankdata(method="average")``),
    back-transformed with Blom's offset, ``(r - 3/8) / (N - 3/4 + 1)``, then mapped
    through the standard normal quantile function. Rows without ties all share one
    table of normal scores; only tied positions are recomputed.
    """
    e, n = sorted_a.shape
    pos = np.arange(n)
    scale = n - 2 * _BLOM_OFFSET + 1
    z_sorted = np.empty((e, n))
    z_sorted[:] = special.ndtri((pos + 1.0 - _BLOM_OFFSET) / scale)
    equal_next = sorted_a[:, 1:] == sorted_a[:, :-1]  # (E, N-1)
    if equal_next.any():
        # Ties are sparse: visit only tied positions, grouped into runs of equal values
        # (a run never crosses rows: column 0 starts one, column N-1 ends one).
        tied_prev = np.zeros((e, n), dtype=bool)
        tied_prev[:, 1:] = equal_next
        tied_next = np.zeros((e, n), dtype=bool)
        tied_next[:, :-1] = equal_next
        rows, cols = np.nonzero(tied_prev | tied_next)
        run_id = np.cumsum(~tied_prev[rows, cols]) - 1
        first = cols[~tied_prev[rows, cols]][run_id]
        last = cols[~tied_next[rows, cols]][run_id]
        average_rank = (first + last) / 2.0 + 1.0
        z_sorted[rows, cols] = special.ndtri((average_rank - _BLOM_OFFSET) / scale)
    z = np.empty((e, n))
    np.put_along_axis(z, order, z_sorted, axis=-1)
    return z


def _z_scale(y: np.ndarray) -> np.ndarray:
    """Rank-normalise each entry of (E, M, n) jointly over all its M·n values."""
    e, m, n = y.shape
    return _z_scale_sorted(*_sort_rows(y.reshape(e, m * n))).reshape(e, m, n)


def _rhat_core(y: np.ndarray) -> np.ndarray:
    """Classic potential scale reduction of (E, M, n) -> (E,), no splitting."""
    n = y.shape[2]
    chain_mean = y.mean(axis=2)
    chain_var = y.var(axis=2, ddof=1)
    between = n * chain_mean.var(axis=1, ddof=1)
    within = chain_var.mean(axis=1)
    return np.sqrt((between / within + n - 1) / n)


def _ess_core(y: np.ndarray) -> np.ndarray:
    """Effective sample size of (E, M, n) -> (E,), as ArviZ's ``_ess`` (``relative=False``).

    Autocovariances by FFT for every chain, averaged over chains; the combined
    autocorrelation ``rho_t = 1 - (W - acov_t) / var_plus``; Geyer's initial positive
    sequence (pairs ``rho_{2k} + rho_{2k+1}`` kept while positive) and initial
    monotone sequence (the pair sums replaced by their running minimum), done with
    cumulative masks instead of a loop. Entries whose range is below
    ``np.finfo(float).resolution`` get ``M·n``.
    """
    e, m_chain, n = y.shape
    size = m_chain * n
    constant = (y.max(axis=(1, 2)) - y.min(axis=(1, 2))) < _CONSTANT_RANGE

    # Mean autocovariance over chains, lags 0..n-1 (zero-padded FFT, biased /n).
    centred = y - y.mean(axis=2, keepdims=True)
    n_fft = next_fast_len(2 * n, real=True)
    spectrum = np.fft.rfft(centred, n=n_fft, axis=2)
    power = (spectrum.real**2 + spectrum.imag**2).mean(axis=1)
    acov = np.fft.irfft(power, n=n_fft, axis=1)[:, :n] / n

    mean_var = acov[:, 0] * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if m_chain > 1:
        var_plus = var_plus + y.mean(axis=2).var(axis=1, ddof=1)
    rho = 1.0 - (mean_var[:, None] - acov) / var_plus[:, None]
    rho_odd_is_nan = np.isnan(rho[:, 1])
    rho[:, 0] = 1.0

    # Pair sums S_k = rho_{2k} + rho_{2k+1}, k = 0..k_max (k_max: last pair ArviZ visits).
    k_max = max((n - 1) // 2 - 1, 0)
    pair = rho[:, 0 : 2 * k_max + 2 : 2] + rho[:, 1 : 2 * k_max + 2 : 2]
    # K = number of leading positive pair sums among S_0..S_{k_max-1}: pairs 0..K-1 enter
    # tau through their running minimum (initial monotone sequence).
    n_pos = np.cumprod(pair[:, :k_max] > 0, axis=1).sum(axis=1)
    k_idx = np.arange(k_max + 1)
    head = np.where(k_idx < n_pos[:, None], np.minimum.accumulate(pair, axis=1), 0.0)
    rows = np.arange(e)
    # rho_{2K} is added once more when pair K was kept (S_K >= 0) or is itself positive.
    rho_even = rho[rows, 2 * n_pos]
    keep_even = (rho_even > 0) | ((n_pos >= 1) & (pair[rows, n_pos] >= 0))
    tau = -1.0 + 2.0 * head.sum(axis=1) + np.where(keep_even, rho_even, 0.0)

    tau = np.maximum(tau, 1.0 / np.log10(size))
    ess = size / tau
    ess[rho_odd_is_nan] = np.nan
    ess[constant] = size
    return ess


def _type7_quantiles(
    flat: np.ndarray, probs: Sequence[float], *, is_sorted: bool = False
) -> np.ndarray:
    """Quantiles of each row of (E, N) -> (E, len(probs)).

    The formula of ``scipy.stats.mstats.mquantiles(alphap=1, betap=1)`` (R type 7),
    the one ArviZ uses, written out so ties give bit-identical thresholds. Rows
    already sorted (``is_sorted=True``) skip the partial sort.
    """
    n = flat.shape[1]
    alphap = betap = 1
    p = np.asarray(probs, dtype=float)
    m = alphap + p * (1.0 - alphap - betap)
    aleph = n * p + m
    k = np.floor(aleph.clip(1, n - 1)).astype(int)
    gamma = (aleph - k).clip(0, 1)
    part = flat if is_sorted else np.partition(flat, np.unique(np.concatenate([k - 1, k])), axis=1)
    return (1.0 - gamma) * part[:, k - 1] + gamma * part[:, k]


# ---------------------------------------------------------------------------
# One block of entries, with the intermediates shared between statistics.
# ---------------------------------------------------------------------------


class _Block:
    """Series of one chunk of entries, shape (E, chain, draw), draws >= MIN_DRAWS.

    ``y`` is float64; ``fold_dtype`` is the caller's floating dtype (float64 for
    integer or boolean input), in which ArviZ folds draws about their median.
    """

    def __init__(self, y: np.ndarray, fold_dtype: np.dtype) -> None:
        self.valid = ~np.isnan(y).any(axis=(1, 2))
        if not self.valid.all():  # keep NaN out of the kernels; masked at the end
            y = np.where(self.valid[:, None, None], y, 0.0)
        self.y = y
        self.fold_dtype = fold_dtype

    def _finish(self, values: np.ndarray) -> np.ndarray:
        return np.where(self.valid, values, np.nan)

    @cached_property
    def split(self) -> np.ndarray:
        return _split_chains(self.y)

    @cached_property
    def split_sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """Argsort order and sorted values of each entry's split draws, (E, 2C·(D//2))."""
        return _sort_rows(self.split.reshape(self.split.shape[0], -1))

    @cached_property
    def z_split(self) -> np.ndarray:
        return _z_scale_sorted(*self.split_sorted).reshape(self.split.shape)

    def rhat(self) -> np.ndarray:
        if self.y.shape[1] < 2:
            return np.full(self.y.shape[0], np.nan)
        bulk = _rhat_core(self.z_split)
        # Median of the split draws (an even number of them): np.mean of the middle two,
        # as np.median does. Folding happens in the input's precision, as in ArviZ:
        # float32 rounding of |x - median| can create or break ties, which move ranks.
        sorted_split = self.split_sorted[1].astype(self.fold_dtype, copy=False)
        mid = sorted_split.shape[1] // 2
        median = np.mean(sorted_split[:, mid - 1 : mid + 1], axis=1)
        split = self.split.astype(self.fold_dtype, copy=False)
        folded = np.abs(split - median[:, None, None]).astype(float, copy=False)
        tail = _rhat_core(_z_scale(folded))
        # ArviZ takes Python's max(bulk, tail): tail only when strictly larger.
        return self._finish(np.where(tail > bulk, tail, bulk))

    def ess_bulk(self) -> np.ndarray:
        return self._finish(_ess_core(self.z_split))

    def ess_tail(self) -> np.ndarray:
        e, _, n_draw = self.y.shape
        # Quantiles of all draws; with an even draw count those are the split draws.
        if n_draw % 2 == 0:
            q = _type7_quantiles(self.split_sorted[1], TAIL_PROBS, is_sorted=True)
        else:
            q = _type7_quantiles(self.y.reshape(e, -1), TAIL_PROBS)
        low, high = (
            _ess_core((self.split <= q[:, i, None, None]).astype(float))
            for i in range(len(TAIL_PROBS))
        )
        return self._finish(np.where(high < low, high, low))

    @cached_property
    def _ess_mean(self) -> np.ndarray:
        return _ess_core(self.split)

    def ess_mean(self) -> np.ndarray:
        return self._finish(self._ess_mean)

    def mcse_mean(self) -> np.ndarray:
        sd = self.y.std(axis=(1, 2), ddof=1)
        return self._finish(sd / np.sqrt(self._ess_mean))

    def mcse_sd(self) -> np.ndarray:
        sq_dev = (self.y - self.y.mean(axis=(1, 2), keepdims=True)) ** 2
        ess = _ess_core(_split_chains(sq_dev))
        evar = sq_dev.mean(axis=(1, 2))
        varvar = ((sq_dev**2).mean(axis=(1, 2)) - evar**2) / ess
        return self._finish(np.sqrt(varvar / evar / 4))


_STATISTICS: dict[str, Callable[[_Block], np.ndarray]] = {
    "rhat": _Block.rhat,
    "ess_bulk": _Block.ess_bulk,
    "ess_tail": _Block.ess_tail,
    "ess_mean": _Block.ess_mean,
    "mcse_mean": _Block.mcse_mean,
    "mcse_sd": _Block.mcse_sd,
}


def _compute(x: ArrayLike, names: Sequence[str]) -> dict[str, np.ndarray | np.float64]:
    """Evaluate the named statistics for every entry of ``x`` (chain, draw, *entries)."""
    arr = np.asarray(x)
    fold_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(float)
    arr = arr.astype(float, copy=False)
    if arr.ndim < 2:
        raise ValueError(
            f"x must have shape (chain, draw, *entries) with at least 2 dimensions, "
            f"got shape {arr.shape}"
        )
    n_chain, n_draw = arr.shape[:2]
    entries = arr.shape[2:]
    n_entries = int(np.prod(entries))
    series = np.moveaxis(arr.reshape(n_chain, n_draw, n_entries), 2, 0)  # (E, C, D) view
    out = {name: np.full(n_entries, np.nan) for name in names}
    if n_chain >= 1 and n_draw >= MIN_DRAWS and n_entries > 0:
        step = max(1, _CHUNK_ELEMENTS // (n_chain * n_draw))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for start in range(0, n_entries, step):
                stop = min(start + step, n_entries)
                block = _Block(np.ascontiguousarray(series[start:stop]), fold_dtype)
                for name in names:
                    out[name][start:stop] = _STATISTICS[name](block)
    return {name: values.reshape(entries)[()] for name, values in out.items()}


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def rhat(x: ArrayLike) -> np.ndarray | np.float64:
    """Rank-normalised split R-hat of every entry, as ``az.rhat(..., method="rank")``.

    The maximum of the bulk R-hat (split chains, rank-normalised jointly) and the
    tail R-hat (split chains folded about their median, then rank-normalised).

    Parameters
    ----------
    x : array, shape (chain, draw, *entries)

    Returns
    -------
    array, shape entries (a scalar when there are no entry dimensions); NaN for
    entries with NaN, for a single chain, for fewer than 4 draws, and for constant
    entries.
    """
    return _compute(x, ("rhat",))["rhat"]


def ess_bulk(x: ArrayLike) -> np.ndarray | np.float64:
    """Bulk effective sample size, as ``az.ess(..., method="bulk")``.

    ESS of the rank-normalised split chains (absolute, not relative).

    Parameters
    ----------
    x : array, shape (chain, draw, *entries)

    Returns
    -------
    array, shape entries (a scalar when there are no entry dimensions).
    """
    return _compute(x, ("ess_bulk",))["ess_bulk"]


def ess_tail(x: ArrayLike) -> np.ndarray | np.float64:
    """Tail effective sample size, as ``az.ess(..., method="tail")``.

    The smaller of the ESS of the split-chain indicators ``x <= q_0.05`` and
    ``x <= q_0.95`` (quantiles of all draws of the entry, R type 7).

    Parameters
    ----------
    x : array, shape (chain, draw, *entries)

    Returns
    -------
    array, shape entries (a scalar when there are no entry dimensions).
    """
    return _compute(x, ("ess_tail",))["ess_tail"]


def ess_mean(x: ArrayLike) -> np.ndarray | np.float64:
    """Effective sample size of the mean, as ``az.ess(..., method="mean")``.

    ESS of the split chains on the original scale (no rank normalisation).

    Parameters
    ----------
    x : array, shape (chain, draw, *entries)

    Returns
    -------
    array, shape entries (a scalar when there are no entry dimensions).
    """
    return _compute(x, ("ess_mean",))["ess_mean"]


def mcse_mean(x: ArrayLike) -> np.ndarray | np.float64:
    """Monte Carlo standard error of the mean, as ``az.mcse(..., method="mean")``.

    ``sd / sqrt(ess_mean)`` with ``sd`` the standard deviation (ddof=1) of all draws.

    Parameters
    ----------
    x : array, shape (chain, draw, *entries)

    Returns
    -------
    array, shape entries (a scalar when there are no entry dimensions).
    """
    return _compute(x, ("mcse_mean",))["mcse_mean"]


def mcse_sd(x: ArrayLike) -> np.ndarray | np.float64:
    """Monte Carlo standard error of the sd, as ``az.mcse(..., method="sd")``.

    With ``s = (x - mean)^2``: ``sqrt((mean(s^2) - mean(s)^2) / ess_mean(s) / mean(s) / 4)``.

    Parameters
    ----------
    x : array, shape (chain, draw, *entries)

    Returns
    -------
    array, shape entries (a scalar when there are no entry dimensions); NaN for
    constant entries.
    """
    return _compute(x, ("mcse_sd",))["mcse_sd"]


def summary(x: ArrayLike) -> dict[str, np.ndarray | np.float64]:
    """R-hat, bulk and tail ESS and MCSE of the mean for every entry, in one pass.

    Shares the split chains and the rank normalisation between the statistics, so it
    is cheaper than calling the four functions one after another.

    Parameters
    ----------
    x : array, shape (chain, draw, *entries)

    Returns
    -------
    dict with keys ``"rhat"``, ``"ess_bulk"``, ``"ess_tail"``, ``"mcse_mean"``, each
    an array of shape entries (a scalar when there are no entry dimensions).
    """
    return _compute(x, ("rhat", "ess_bulk", "ess_tail", "mcse_mean"))

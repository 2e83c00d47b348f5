"""Step-size bias of SG-MCMC susceptibilities, and Richardson extrapolation to ε → 0.

SG kernels at finite step size ε sample a law that is not the posterior: for full-batch
SGLD on a quadratic potential the stationary covariance is (K − εK²/4)⁻¹ = Σ + εI/4 +
O(ε²), so every χ carries a bias that is first order in ε (≈ 5–80% of χ, typically
≈ 10%, at the literature defaults ε = 1e-3, γ = 300, nβ = 30 on a 3-weight
linear–Gaussian example). Running the same component at ε, ε/2 (and ε/4) and
extrapolating the estimates to ε = 0 removes the leading terms:

    χ̂₀ = Σ_j w_j χ̂(ε_j),   w_j = Π_{m≠j} ε_m / (ε_m − ε_j)

(the Lagrange polynomial through the points, evaluated at 0: 2χ(ε/2) − χ(ε) for two
step sizes, (8χ(ε/4) − 6χ(ε/2) + χ(ε))/3 for three).

**Coupling of the runs** (``step_size_study(coupling=...)``). The variance of χ̂₀ is
wᵀCw, C the covariance of the runs' estimates; the weights are large (Σw² = 5 for two
step sizes), so C decides whether extrapolation is affordable.

- ``"common"`` (default wherever it applies): common random numbers, synchronously
  coupled. Every run uses the user's seed; the finest run (step ε·f_min) draws one
  Gaussian vector per step, and a run r = f/f_min times coarser uses, for each of its
  steps, the normalized sum of the r vectors the finest run draws over the same stretch
  of time — the same Brownian increment. Draw t of every run then falls at the same
  dynamical time and is driven by the same noise, so the runs' χ estimates are almost
  perfectly correlated (ρ ≈ 0.996 on the linear–Gaussian model) and 2χ̂(ε/2) − χ̂(ε) has
  about the variance of χ̂(ε) alone: the bias is removed at no cost in variance (the
  extrapolated interval is ≈ 0.91× as wide as the plain run's there).
  Needs a kernel that draws exactly one Gaussian vector per step (``sgld``, ``psgld``,
  ``sghmc``, ``sgnht``), full-batch gradients (one training batch: with minibatches the
  driver's batch order is shared per step, not per unit of time, and that coupling is
  not captured), and factors of the form f_min·(integer) with burn-in and thinning that
  scale to whole steps.
- ``"independent"``: run j gets its own seed, derived deterministically from the
  user's: the first run keeps ``seed`` itself (so a run at factor 1 listed first is the
  user's ordinary run), run j ≥ 1 gets ``SeedSequence(seed, spawn_key=(0x57E9, j))``'s
  first 32-bit word. C is diagonal.
- (Before issue 18 every run simply reused ``seed``: the same noise stream, consumed at
  one vector per *step*, so run ε/2 met at time τ/2 the noise run ε met at τ. Their
  estimates correlated (ρ ≈ 0.1–0.6, growing with run length) while the interval
  assumed independence: it covered the posterior χ 98–100% of the time, too wide. That
  cross-correlation is not between aligned draws, so no paired estimate can use it.)

**The extrapolated interval** (:func:`extrapolate_draws`, what ``step_size_study``
returns) is the default ``ess_t`` interval of :mod:`bayes_susc.estimation.susceptibility`
applied to the *combined product series* c_t = Σ_j w_j s_t^{(j)}, s^{(j)} the product
series of run j paired by (chain, draw): χ̂₀ = −Σ_t c_t/(n − 1) exactly, and the MCSE
of its mean (ESS of c, Geyer) estimates wᵀCw with C the long-run (cross-)covariance of
the runs' product series — whatever the coupling, since independent runs simply have no
cross-covariance. The t quantile takes ν = ESS_c/(κ̂_c − 1) degrees of freedom as for a
single run. Measured (``python -m diagnostics.step_size_extrapolation``, report in
diagnostics/reports/step_size_extrapolation/: 100 replications × 8 entries,
linear–Gaussian model, ε = 1e-3 and ε/2, 4 chains, 200–4,000 draws per chain): coverage
of the *posterior* χ 0.943–0.966 with common coupling and 0.949–0.970 with independent
runs; the common-coupling interval is ≈ 0.91× the plain run's width, the independent one
≈ 2.0–2.1×. The plain interval covers the posterior χ only 0.63 at 4 × 4,000. The
remaining bias is second order in ε: at ε = 3e-3 it is ≈ 9× larger, and at 4 × 4,000
the two-step interval covers only 0.48; a third step size, factors (1, 0.5, 0.25),
brings it to 0.96 (0.71× the plain width).
:func:`extrapolate` combines per-run estimates instead (no draws needed) under the
assumption of independent runs: SE² = Σ w_j² SE_j², half-width √(Σ w_j² h_j²); it is
valid for independent runs only and a little conservative (0.96–0.98).

**When extrapolation pays.** The plain estimate χ̂(ε) has error² ≈ b² + SE_plain², b
its step-size bias; the extrapolated one ≈ SE₀² (its bias is second order in ε). With
b̂ = χ̂(ε) − χ̂₀ (field ``bias``) and its standard error SE_b (``bias_se``, the MCSE of
the difference series Σ_j d_j s^{(j)}, d = e_plain − w), E[b̂²] = b² + SE_b², so
b̂² − SE_b² is unbiased for b² (it can be negative). The rule: extrapolate when

    Σ_i (SE_plain,i² + b̂_i² − SE_b,i²)  >  Σ_i SE₀,i²,

summed over the probe entries of a component (pooled: one entry's b̂² − SE_b² is too
noisy to decide on, and a response-matrix column is reported with one estimator).
Output: ``extrapolation_pays`` (per component), per entry ``rmse_plain`` =
√(SE_plain² + max(b̂² − SE_b², 0)) and ``rmse_extrapolated`` = SE₀, and the pooled
``pooled_rmse_plain``/``pooled_rmse_extrapolated`` (root mean over entries). With
independent runs SE₀² ≈ 5·SE_plain², so extrapolation pays only once |b| > ≈ 2·SE_plain
(long runs, or larger ε); with common coupling SE₀ ≈ SE_plain and it pays as soon as the
bias is detectable. Measured (same study): with common coupling the rule chose to
extrapolate in 98–100% of replications at every run length, and extrapolating was the
better choice there (oracle: expected pooled squared error over all replications); with
independent runs at ε = 1e-3 the plain estimate was the better one at every length up to
4 × 4,000 and the rule said so in 69–82% of replications. Its mistakes lean toward
extrapolating: at small ESS the MCSE of the heavy-tailed product series runs ≈ 10–15%
low, so b̂² − SE_b² overstates b² by up to a quarter of Var(b̂).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr
from scipy import stats

from bayes_susc.validation import check_fraction, check_int, check_positive

if TYPE_CHECKING:
    from bayes_susc.checks.ground_truth import LinearGaussianProblem

Coupling = Literal["auto", "common", "independent"]
COUPLINGS = ("auto", "common", "independent")
#: Registered kernels whose step draws exactly one Gaussian vector (scaled by √step) and
#: nothing else from the noise source: the ones ``coupling="common"`` can couple.
COUPLABLE_KERNELS = frozenset({"sgld", "psgld", "sghmc", "sgnht"})
_RUN_SEED_KEY = 0x57E9  # spawn-key tag of the derived per-run seeds (independent runs)
_MIN_EXCESS = 1e-3  # floor on kurtosis − 1 in the t degrees of freedom (as estimate's ess_t)
_MIN_DOF = 2.0  # floor on the t degrees of freedom (as estimate's ess_t)
_MAX_VALUES = 2**22  # float64 values per product-series block (32 MiB)


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


def run_seeds(seed: int, num_runs: int) -> list[int]:
    """Seeds of independent step-size runs: ``seed`` itself, then derived ones.

    Run 0 keeps the user's seed; run j ≥ 1 gets the first 32-bit word of
    ``SeedSequence(seed, spawn_key=(0x57E9, j))`` — deterministic, distinct from ``seed``
    and from one another, and from the driver's per-chain keys ``(k,)``.
    """
    seed = check_int("seed", seed, minimum=0)
    out = [seed]
    for j in range(1, check_int("num_runs", num_runs, minimum=1)):
        ss = np.random.SeedSequence(seed, spawn_key=(_RUN_SEED_KEY, j))
        out.append(int(ss.generate_state(1)[0]))
    return out


def _add_rule(
    out: xr.Dataset, se_plain: xr.DataArray, se_extrap: xr.DataArray, bias_se: xr.DataArray
) -> xr.Dataset:
    """The extrapolate-or-not fields (module docstring, "When extrapolation pays")."""
    bias2 = out["bias"] ** 2 - bias_se**2  # unbiased for the squared bias, may be < 0
    out["bias_se"] = bias_se
    out["rmse_plain"] = np.sqrt(se_plain**2 + bias2.clip(min=0.0))
    out["rmse_extrapolated"] = se_extrap.copy()
    pool = [d for d in out["chi"].dims if d != "component"]
    # Entries without a finite estimate (a diverged component) drop out of the means.
    mse_plain = (se_plain**2 + bias2).mean(pool, skipna=True)
    mse_extrap = (se_extrap**2).mean(pool, skipna=True)
    out["pooled_rmse_plain"] = np.sqrt(mse_plain.clip(min=0.0))
    out["pooled_rmse_extrapolated"] = np.sqrt(mse_extrap)
    out["extrapolation_pays"] = mse_plain > mse_extrap
    return out


def extrapolate(estimates: Sequence[xr.Dataset], step_sizes: Sequence[float]) -> xr.Dataset:
    """Richardson-extrapolated χ from estimates of *independent* runs at several step sizes.

    Needs only the per-run estimates, and assumes the runs independent (their own seeds:
    ``step_size_study(coupling="independent")``); for runs that share noise use
    :func:`extrapolate_draws`, which estimates the covariance between the runs from the
    paired draws.

    Args:
        estimates: outputs of :func:`bayes_susc.estimation.susceptibility.estimate` (or
            ``estimate_many``), one per step size, over the same entries; each needs
            ``chi``, ``se``, ``ci_low``, ``ci_high``.
        step_sizes: the ε of each run (any order, distinct, > 0).

    Returns:
        Dataset over the entries with ``chi`` (extrapolated), ``se`` (√Σ w_j² SE_j²),
        ``ci_low``, ``ci_high`` (half-width √Σ w_j² h_j², h_j run j's half-width, which
        keeps each run's t quantile), ``chi_plain`` (the estimate at the largest ε),
        ``bias`` (plain − extrapolated, the estimated step-size bias of the plain
        estimate), ``bias_exceeds_interval`` (|bias| larger than the plain interval's
        half-width: the plain interval is then not to be trusted for the posterior χ),
        and the rule's fields ``bias_se``, ``rmse_plain``, ``rmse_extrapolated``,
        ``pooled_rmse_plain``, ``pooled_rmse_extrapolated`` and ``extrapolation_pays``
        (pooled over every dimension but ``component``; see the module docstring).
        Units of χ throughout. Attrs hold the step sizes, weights and
        ``coupling="independent"``.
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
    at = int(np.argmax(step_sizes))
    plain = estimates[at]
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
    # bias = Σ_j d_j χ̂_j with d = e_plain − w; independent runs: Var = Σ d_j² SE_j².
    d = -weights
    d[at] += 1.0
    bias_se = np.sqrt(sum(dj**2 * ds["se"] ** 2 for dj, ds in zip(d, estimates)))
    out = _add_rule(out, plain["se"], se, bias_se)
    out.attrs["step_sizes"] = [float(e) for e in step_sizes]
    out.attrs["richardson_weights"] = weights.tolist()
    out.attrs["coupling"] = "independent"
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


# --------------------------------------------------------------------------------------
# Extrapolation from the paired draws
# --------------------------------------------------------------------------------------


def _read_draws(data: Any, label: str) -> tuple[np.ndarray, Any, np.ndarray, dict]:
    """φ (C, D), ΔL = ℓ − L_E (C, D, P; array or lazy DataArray), diverged (C,), coords."""
    from bayes_susc.storage.draws import get_group, group_names

    flagged = None
    if isinstance(data, Mapping) and not hasattr(data, "groups"):
        if "phi" not in data or "delta_loss" not in data:
            raise ValueError(
                f"{label}: a mapping of arrays needs 'phi' (chain, draw) and 'delta_loss' "
                f"(chain, draw, probe); got keys {sorted(data)}"
            )
        phi = np.asarray(data["phi"], dtype=float)
        delta = np.asarray(data["delta_loss"], dtype=float)
        coords = {}
    else:
        if isinstance(data, xr.Dataset):
            post = data
        else:
            try:
                names = group_names(data)
            except (AttributeError, TypeError):
                raise TypeError(
                    f"{label} must be a sampling result (InferenceData/DataTree), its "
                    f"posterior Dataset or a mapping of arrays; got {type(data).__name__}"
                ) from None
            post = get_group(data, "posterior")
            if "sample_stats" in names and "diverged" in get_group(data, "sample_stats"):
                div = get_group(data, "sample_stats")["diverged"].transpose("chain", "draw")
                flagged = np.asarray(div.values, dtype=bool).any(axis=1)
        missing = [v for v in ("phi", "probe_loss", "eval_loss") if v not in post]
        if missing:
            raise ValueError(f"{label}: the posterior lacks {missing}, as written by sample()")
        phi = np.asarray(post["phi"].transpose("chain", "draw").values, dtype=float)
        # ΔL stays lazy (a store-backed run is read block by block).
        delta = post["probe_loss"].transpose("chain", "draw", "probe") - post["eval_loss"]
        coords = {
            n: np.asarray(c.values)
            for n, c in post["probe_loss"].coords.items()
            if c.dims == ("probe",)
        }
    if phi.ndim != 2 or delta.ndim != 3 or tuple(delta.shape[:2]) != phi.shape:
        raise ValueError(
            f"{label}: phi must be (chain, draw) and the loss differences (chain, draw, "
            f"probe) with the same (chain, draw); got {phi.shape} and {tuple(delta.shape)}"
        )
    bad = ~np.isfinite(phi).all(axis=1)
    return phi, delta, bad if flagged is None else bad | flagged, coords


def _ess_t(series: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(SE, t degrees of freedom) of −Σ series/(n − 1) for a (chain, draw, entries)
    series: the ``ess_t`` method of :func:`~bayes_susc.estimation.susceptibility.estimate`
    (SE = MCSE of the mean via ESS_mean, ν = ESS_mean/(κ̂ − 1) ≥ 2)."""
    from bayes_susc.estimation import convergence

    flat = series.reshape(n, -1)
    dev = flat - flat.mean(axis=0)
    m2 = np.mean(dev**2, axis=0)
    sd = np.sqrt(m2 * n / (n - 1))
    ess = np.asarray(convergence.ess_mean(series), dtype=float).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = sd / np.sqrt(ess) * n / (n - 1)
        kurt = np.mean(dev**4, axis=0) / m2**2
        dof = ess / np.maximum(kurt - 1.0, _MIN_EXCESS)
    dof = np.where(np.isfinite(dof), np.maximum(dof, _MIN_DOF), _MIN_DOF)
    se = np.where(m2 == 0, 0.0, se)  # a constant series has no Monte Carlo error
    return se, dof


def extrapolate_draws(
    runs: Sequence[Any], step_sizes: Sequence[float], *, confidence: float = 0.95
) -> xr.Dataset:
    """Richardson-extrapolated χ with its own interval, from the paired draws of the runs.

    The runs must have the same chains, draws and probe items, draw t of every run taken
    at the same dynamical time (what :func:`step_size_study` does). χ̂₀ and its interval
    come from the combined product series Σ_j w_j s^{(j)} (module docstring), so the
    covariance between the runs' estimates — large under common random numbers, zero
    for independent runs — is in the standard error. A chain that diverged in any run is
    dropped from every run (the pairing needs the same chains).

    Args:
        runs: one component's sampling results (InferenceData/DataTree from
            :func:`bayes_susc.sample`, a posterior Dataset, or ``{"phi": (chain, draw),
            "delta_loss": (chain, draw, probe)}``), one per step size.
        step_sizes: the ε of each run (distinct, > 0).
        confidence: interval level in (0, 1).

    Returns:
        Dataset over ``probe`` with ``chi`` (extrapolated), ``se``, ``ci_low``,
        ``ci_high`` (t interval), ``chi_plain`` and ``se_plain``, ``ci_low_plain``,
        ``ci_high_plain`` (the run at the largest ε, ``ess_t``), ``bias``,
        ``bias_exceeds_interval``, the rule's fields (as :func:`extrapolate`),
        ``chi_runs`` and ``se_runs`` over (``step_size``, ``probe``) and
        ``run_correlation`` over (``step_size``, ``step_size_other``, ``probe``): the
        estimated correlation of the runs' χ estimates (pairwise from the MCSE of the
        difference series). χ units throughout. Attrs: step sizes, weights, confidence,
        chains kept.

    Raises:
        ValueError: mismatched runs or step sizes, an argument out of range, or fewer
            than two chains' worth of draws left after dropping diverged chains.
    """
    if isinstance(runs, (str, bytes)) or not isinstance(runs, Sequence):
        raise TypeError(f"runs must be a sequence of sampling results, got {type(runs).__name__}")
    if len(runs) != len(step_sizes):
        raise ValueError(f"runs and step_sizes must pair up, got {len(runs)} and {len(step_sizes)}")
    weights = richardson_weights(step_sizes)
    confidence = check_fraction("confidence", confidence, open_low=True)
    read = [_read_draws(r, f"runs[{k}]") for k, r in enumerate(runs)]
    shape = tuple(read[0][1].shape)
    for k, (_, delta, _, _) in enumerate(read):
        if tuple(delta.shape) != shape:
            raise ValueError(
                f"runs[{k}] has (chain, draw, probe) = {tuple(delta.shape)}, runs[0] has "
                f"{shape}: paired extrapolation needs the same chains, draws and probe items"
            )
    keep = ~np.any([r[2] for r in read], axis=0)
    c, d, p = shape
    n = int(keep.sum()) * d
    if keep.sum() < 1 or n < 4:
        raise ValueError(
            f"fewer than 4 paired draws are left ({n}) after dropping the {int((~keep).sum())} "
            "chain(s) that diverged in some run; rerun with a smaller step_size"
        )
    at = int(np.argmax(step_sizes))
    k_runs = len(runs)
    diff = -weights
    diff[at] += 1.0
    phis = [r[0][keep] for r in read]
    chi_runs = np.empty((k_runs, p))
    se_runs = np.empty((k_runs, p))
    corr = np.full((k_runs, k_runs, p), np.nan)
    fields = {k: np.empty(p) for k in ("chi", "se", "dof", "dof_plain", "bias_se")}
    block = max(1, _MAX_VALUES // max(1, n))
    for start in range(0, p, block):
        sl = slice(start, min(p, start + block))
        series = []
        for phi, (_, delta, _, _) in zip(phis, read):
            dl = np.asarray(delta[:, :, sl], dtype=float)[keep]
            if not np.isfinite(dl).all():
                raise ValueError(
                    "non-finite loss differences in a chain not flagged as diverged; "
                    "pass the runs as written by sample()"
                )
            centred = phi - phi.mean()
            series.append(centred[:, :, None] * (dl - dl.mean(axis=(0, 1))))
        for j, s in enumerate(series):
            chi_runs[j, sl] = -s.sum(axis=(0, 1)) / (n - 1)
            se_runs[j, sl], dof = _ess_t(s, n)
            if j == at:
                fields["dof_plain"][sl] = dof
        combined = sum(w * s for w, s in zip(weights, series))
        fields["chi"][sl] = -combined.sum(axis=(0, 1)) / (n - 1)
        fields["se"][sl], fields["dof"][sl] = _ess_t(combined, n)
        difference = sum(dj * s for dj, s in zip(diff, series))
        fields["bias_se"][sl] = _ess_t(difference, n)[0]
        for j in range(k_runs):
            corr[j, j, sl] = 1.0
            for m in range(j + 1, k_runs):
                se_jm = _ess_t(series[j] - series[m], n)[0]
                cov = 0.5 * (se_runs[j, sl] ** 2 + se_runs[m, sl] ** 2 - se_jm**2)
                with np.errstate(divide="ignore", invalid="ignore"):
                    corr[j, m, sl] = corr[m, j, sl] = cov / (se_runs[j, sl] * se_runs[m, sl])
    probe_coords = {"probe": np.arange(p)}
    probe_coords.update(read[at][3])
    coords = {name: ("probe", v) for name, v in probe_coords.items()}
    coords["step_size"] = ("step_size", np.asarray(step_sizes, dtype=float))
    coords["step_size_other"] = ("step_size_other", np.asarray(step_sizes, dtype=float))
    chi, se = fields["chi"], fields["se"]
    se_plain = se_runs[at]

    def half_width(se_: np.ndarray, dof: np.ndarray, level: float) -> np.ndarray:
        return stats.t.ppf(0.5 + level / 2, dof) * se_

    half = half_width(se, fields["dof"], confidence)
    plain_half = half_width(se_plain, fields["dof_plain"], confidence)
    chi_plain = chi_runs[at]
    bias = chi_plain - chi
    out = xr.Dataset(
        {
            "chi": ("probe", chi),
            "se": ("probe", se),
            "ci_low": ("probe", chi - half),
            "ci_high": ("probe", chi + half),
            "dof": ("probe", fields["dof"]),
            "chi_plain": ("probe", chi_plain),
            "se_plain": ("probe", se_plain),
            "ci_low_plain": ("probe", chi_plain - plain_half),
            "ci_high_plain": ("probe", chi_plain + plain_half),
            "bias": ("probe", bias),
            "bias_exceeds_interval": ("probe", np.abs(bias) > plain_half),
            "chi_runs": (("step_size", "probe"), chi_runs),
            "se_runs": (("step_size", "probe"), se_runs),
            "run_correlation": (("step_size", "step_size_other", "probe"), corr),
        },
        coords=coords,
    )
    out = _add_rule(out, out["se_plain"], out["se"], xr.DataArray(fields["bias_se"], dims="probe"))
    out.attrs.update(
        {
            "step_sizes": [float(e) for e in step_sizes],
            "richardson_weights": weights.tolist(),
            "confidence": confidence,
            "method": "ess_t on the combined product series",
            "num_chains_kept": int(keep.sum()),
            "num_draws_per_chain": d,
        }
    )
    return out


# --------------------------------------------------------------------------------------
# Coupled runs through the sampler
# --------------------------------------------------------------------------------------


class _SummedNoise:
    """A chain's noise stream read r vectors at a time: ``normal`` returns the sum of the
    next r standard normal vectors over √r — the Brownian increment the run r times finer
    draws over the same stretch of time (r separate draws, exactly as that run makes
    them, so both runs read the same numbers from the same generator)."""

    def __init__(self, base: Any, draws: int) -> None:
        self.base = base
        self.draws = draws
        self.device, self.dtype = base.device, base.dtype

    @property
    def num_chains(self) -> int:
        return self.base.num_chains

    def normal(self, *shape: int) -> Any:
        total = self.base.normal(*shape)
        for _ in range(self.draws - 1):
            total = total + self.base.normal(*shape)
        return total / math.sqrt(self.draws)

    def uniform(self) -> Any:
        raise RuntimeError(
            "coupling='common' supports kernels that draw only Gaussian noise; this kernel "
            "drew a uniform: use coupling='independent'"
        )

    def subset(self, index: int) -> _SummedNoise:
        return _SummedNoise(self.base.subset(index), self.draws)


class _CoupledKernel:
    """A kernel whose steps read r noise vectors each (:class:`_SummedNoise`); its
    ``init`` reads the raw stream, as the finest run's does, so the streams stay aligned."""

    def __init__(self, inner: Any, draws: int) -> None:
        self.inner = inner
        self.draws = draws
        self.name = inner.name
        self.full_batch = inner.full_batch
        self.step_size = inner.step_size

    def init(self, position: Any, grad_fn: Any, noise: Any) -> Any:
        return self.inner.init(position, grad_fn, noise)

    def step(self, state: Any, grad_fn: Any, noise: Any) -> tuple[Any, dict]:
        return self.inner.step(state, grad_fn, _SummedNoise(noise, self.draws))

    def hyperparameters(self) -> dict[str, float]:
        return self.inner.hyperparameters()


def _whole(x: float) -> int | None:
    """``x`` as an int when it is one to rounding, else None."""
    r = round(x)
    return int(r) if r >= 1 and abs(x - r) <= 1e-9 * max(1.0, abs(x)) else None


def _plan(
    factors: Sequence[float],
    num_burnin: int,
    steps_per_draw: int,
    coupling: str,
    couplable: str | None,
) -> tuple[str, list[dict[str, int]], str]:
    """Per run: burn-in, thinning, noise vectors per step; the coupling used and why.

    ``couplable`` is None when kernel and posterior allow common coupling, else why not.
    Burn-in and thinning scale with 1/factor (every run covers the same dynamical time).
    """
    fmin = min(factors)
    ratios = [_whole(f / fmin) for f in factors]
    scaled_b = [num_burnin / f for f in factors]
    scaled_k = [steps_per_draw / f for f in factors]
    reason = couplable
    if reason is None and any(r is None for r in ratios):
        reason = f"factors {list(factors)} are not whole multiples of the smallest"
    if reason is None and any(
        _whole(k) is None or (b != 0 and _whole(b) is None) for b, k in zip(scaled_b, scaled_k)
    ):
        reason = (
            f"num_burnin={num_burnin} and steps_per_draw={steps_per_draw} do not scale to "
            f"whole steps at every factor {list(factors)}"
        )
    if coupling == "common" and reason is not None:
        raise ValueError(f"coupling='common' is not possible here: {reason}")
    common = coupling == "common" or (coupling == "auto" and reason is None)
    used = "common" if common else "independent"
    plan = []
    for r, b, k in zip(ratios, scaled_b, scaled_k):
        plan.append(
            {
                "num_burnin": int(round(b)),
                "steps_per_draw": max(1, int(round(k))),
                "noise_draws_per_step": r if used == "common" else 1,
            }
        )
    why = "requested" if coupling != "auto" else (reason or "applicable")
    return used, plan, why


def step_size_study(
    posterior: Any,
    kernel: str = "sgld",
    *,
    eval_data: Any,
    probe_data: Any,
    step_size: float = 1e-3,
    factors: Sequence[float] = (1.0, 0.5),
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin: int = 0,
    steps_per_draw: int = 1,
    seed: int = 0,
    coupling: Coupling = "auto",
    confidence: float = 0.95,
    kernel_kwargs: Mapping[str, float] | None = None,
    probe_coords: Mapping[str, Sequence[Any]] | None = None,
    chain_method: Literal["vectorized", "sequential"] = "vectorized",
    progress: bool | None = None,
) -> tuple[xr.Dataset, list[Any]]:
    """Run one component at ε·factor for each factor and extrapolate χ to ε = 0.

    Burn-in and thinning scale with 1/factor so that every run covers the same
    *dynamical* time (a run at ε/2 takes twice the steps) and draw t of every run falls
    at the same time; every run has ``num_chains`` × ``num_draws`` kept draws. Every
    argument is checked, and every kernel built, before the first run.

    Args:
        posterior: the component's :class:`~bayes_susc.LocalPosterior`.
        kernel: a registered SG kernel name.
        eval_data: the evaluation set E, as for :func:`bayes_susc.sample`.
        probe_data: the probe items, as for :func:`bayes_susc.sample`.
        step_size: the user's ε (factor 1), > 0.
        factors: distinct multipliers of ε, e.g. ``(1, 0.5)`` or ``(1, 0.5, 0.25)``.
        num_chains: chains per run, ≥ 1.
        num_draws: kept draws per chain and run, ≥ 2.
        num_burnin: burn-in steps at factor 1 (≥ 0); scaled by 1/factor for the others.
        steps_per_draw: thinning at factor 1 (≥ 1); scaled by 1/factor for the others.
        seed: the user's seed (≥ 0); see ``coupling`` for how the runs use it.
        coupling: ``"common"`` (all runs share ``seed``'s noise, synchronously: module
            docstring), ``"independent"`` (run j's seed from :func:`run_seeds`) or
            ``"auto"`` (default): common where it applies (a kernel in
            :data:`COUPLABLE_KERNELS` given by name, one training batch, factors and
            scaled burn-in/thinning in whole steps), else independent.
        confidence: level of the extrapolated and plain intervals, in (0, 1).
        kernel_kwargs: the kernel's other hyperparameters (e.g. ``{"friction": 100.0}``
            for SGHMC); not ``step_size``.
        probe_coords: per-probe labels, as for :func:`bayes_susc.sample`.
        chain_method: ``"vectorized"`` or ``"sequential"``, as for
            :func:`bayes_susc.sample`.
        progress: progress bar (``None``: only on a terminal).

    Returns:
        ``(extrapolated, runs)``: the :func:`extrapolate_draws` Dataset (attrs also hold
        ``coupling``, ``coupling_reason`` and the seeds) and the sampling results, one
        per factor (their ``posterior`` attrs record ``step_size_coupling`` and
        ``noise_draws_per_step``).

    Raises:
        ValueError: an argument out of range, naming it (before any sampling).
        TypeError: an argument of the wrong type, naming it.
    """
    from bayes_susc.kernels.base import make_kernel
    from bayes_susc.sampling.driver import sample
    from bayes_susc.target.posterior import LocalPosterior

    if not isinstance(posterior, LocalPosterior):
        raise TypeError(f"posterior must be a LocalPosterior, got {type(posterior).__name__}")
    step_size = check_positive("step_size", step_size)
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"factors must be a sequence of numbers, got {factors!r}")
    factors = [check_positive("factors", f) for f in factors]
    if len(factors) < 2 or len(set(factors)) != len(factors):
        raise ValueError(f"factors must be at least two distinct numbers, got {factors}")
    num_chains = check_int("num_chains", num_chains, minimum=1)
    num_draws = check_int("num_draws", num_draws, minimum=2)
    num_burnin = check_int("num_burnin", num_burnin, minimum=0)
    steps_per_draw = check_int("steps_per_draw", steps_per_draw, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    confidence = check_fraction("confidence", confidence, open_low=True)
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    if chain_method not in ("vectorized", "sequential"):
        raise ValueError(f"chain_method must be 'vectorized' or 'sequential', got {chain_method!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {progress!r}")
    if eval_data is None or probe_data is None:
        name = "eval_data" if eval_data is None else "probe_data"
        raise ValueError(f"{name} is required (a batch or a list of batches), got None")
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a registered kernel name, got {type(kernel).__name__}")
    kernel_kwargs = dict(kernel_kwargs or {})
    if "step_size" in kernel_kwargs:
        raise ValueError("kernel_kwargs may not hold step_size: pass step_size (and factors)")
    # Building each run's kernel now raises on an unknown name, an unknown hyperparameter
    # or an unstable combination before anything is sampled.
    try:
        kernels = [make_kernel(kernel, step_size=step_size * f, **kernel_kwargs) for f in factors]
    except TypeError as err:
        raise ValueError(
            f"kernel_kwargs {sorted(kernel_kwargs)} do not fit kernel {kernel!r}: {err}"
        ) from None
    if kernel not in COUPLABLE_KERNELS:
        couplable = f"kernel {kernel!r} is not one of {sorted(COUPLABLE_KERNELS)}"
    elif len(posterior.train_batches) > 1 and not kernels[0].full_batch:
        couplable = (
            f"the posterior has {len(posterior.train_batches)} training batches (minibatch "
            "order cannot be coupled in time)"
        )
    else:
        couplable = None
    used, plan, why = _plan(factors, num_burnin, steps_per_draw, coupling, couplable)
    seeds = [seed] * len(factors) if used == "common" else run_seeds(seed, len(factors))

    runs = []
    for f, kern, spec, run_seed in zip(factors, kernels, plan, seeds):
        r = spec["noise_draws_per_step"]
        data = sample(
            posterior,
            _CoupledKernel(kern, r) if r > 1 else kern,
            eval_data=eval_data,
            probe_data=probe_data,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin=spec["num_burnin"],
            steps_per_draw=spec["steps_per_draw"],
            seed=run_seed,
            probe_coords=probe_coords,
            chain_method=chain_method,
            progress=progress,
        )
        _tag(data, {"step_size_coupling": used, "noise_draws_per_step": r, "step_factor": f})
        runs.append(data)
    out = extrapolate_draws(runs, [step_size * f for f in factors], confidence=confidence)
    out.attrs.update({"coupling": used, "coupling_reason": why, "seeds": seeds})
    return out, runs


def _tag(data: Any, attrs: dict[str, Any]) -> None:
    """Add ``attrs`` to the posterior group of a sampling result (either backend)."""
    if isinstance(data, xr.DataTree):
        data["posterior"].attrs.update(attrs)
    else:
        data.posterior.attrs.update(attrs)


def simulate_step_size_runs(
    problem: LinearGaussianProblem,
    step_size: float,
    factors: Sequence[float],
    chain_shape: tuple[int, ...],
    num_draws: int,
    steps_per_draw: int,
    num_burnin: int,
    rng: np.random.Generator,
    coupling: Literal["common", "independent", "shared_seed"] = "common",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact numpy counterpart of :func:`step_size_study`'s runs on a linear–Gaussian problem.

    Full-batch SGLD δ' = (I − ε_j K/2)δ + √ε_j ξ from δ = 0 (w*), step by step, at
    ε_j = step_size·f_j with burn-in and thinning scaled by 1/f_j, and the noise coupled
    as the sampler couples it: ``"common"`` (every run reads one stream; a run r times
    coarser than the finest sums r vectors per step over √r), ``"independent"`` (a
    stream per run) or ``"shared_seed"`` (one stream read one vector per step by every
    run: the behaviour before issue 18, for comparison).

    Args:
        problem: the linear–Gaussian problem (its K, φ and probe terms).
        step_size: ε at factor 1 (weight² units, Welling–Teh convention).
        factors: multipliers of ε, one run each.
        chain_shape: leading shape of the chains, e.g. ``(replications, 4)``.
        num_draws: kept draws per chain and run.
        steps_per_draw: thinning at factor 1, scaled by 1/f (whole for ``"common"``).
        num_burnin: burn-in steps at factor 1, scaled by 1/f (whole for ``"common"``;
            factors must then be whole multiples of the smallest, as in
            :func:`step_size_study`).
        rng: source of the streams' seeds.
        coupling: ``"common"``, ``"independent"`` or ``"shared_seed"`` (above).

    Returns:
        Per factor, φ ``(*chain_shape, num_draws)`` and ΔL = ℓ_i − L_E
        ``(*chain_shape, num_draws, probe)`` (up to additive constants).
    """
    factors = [check_positive("factors", f) for f in factors]
    if coupling not in ("common", "independent", "shared_seed"):
        raise ValueError(
            f"coupling must be 'common', 'independent' or 'shared_seed', got {coupling!r}"
        )
    _, plan, _ = _plan(
        factors,
        num_burnin,
        steps_per_draw,
        "common" if coupling == "common" else "independent",
        None,
    )
    K, s = problem.K, problem.dim
    H, g = problem.phi_terms()
    P, lin = problem.probe_terms()
    shared = int(rng.integers(2**63))
    streams = [
        np.random.default_rng(shared if coupling != "independent" else int(rng.integers(2**63)))
        for _ in factors
    ]
    out = []
    for f, spec, stream in zip(factors, plan, streams):
        eps = step_size * f
        A = np.eye(s) - 0.5 * eps * K
        r, b, k = spec["noise_draws_per_step"], spec["num_burnin"], spec["steps_per_draw"]
        x = np.zeros((*chain_shape, s))
        delta = np.empty((*chain_shape, num_draws, s))
        for t in range(b + num_draws * k):
            xi = stream.standard_normal((*chain_shape, s))
            for _ in range(r - 1):
                xi = xi + stream.standard_normal((*chain_shape, s))
            x = x @ A.T + math.sqrt(eps / r) * xi
            kept = t + 1 - b
            if kept > 0 and kept % k == 0:
                delta[..., kept // k - 1, :] = x
        phi = 0.5 * np.einsum("...a,ab,...b->...", delta, H, delta) + delta @ g
        ell = 0.5 * np.einsum("...a,iab,...b->...i", delta, P, delta) + delta @ lin.T
        out.append((phi, ell - phi[..., None]))
    return out


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

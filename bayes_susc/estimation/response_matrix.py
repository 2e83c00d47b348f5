"""The response matrix: susceptibilities over (probe, component), their statuses, analyses.

A response matrix is an ``xarray.Dataset`` over dimensions ``probe`` × ``component``
(DESIGN.md §1, §3) holding, per entry, the estimate ``chi``, its standard error ``se``,
interval ``ci_low``/``ci_high``, two-sided ``p_value`` for χ = 0, convergence statistics
``rhat``, ``ess_bulk``, ``ess_tail``, ``mcse``, and per component ``num_diverged_chains``;
probe metadata (``dataset``, ``sequence``, ``position``, ``token``) are coordinates on
``probe``. :func:`bayes_susc.estimation.susceptibility.estimate_many` builds it;
:func:`assign_status` adds each entry's verdict:

``status``
    ``"ok"``, or the first reason the entry is unreliable, in this order:
    ``"diverged"`` (a chain of its component diverged), ``"nonfinite"`` (χ, SE, interval
    or p-value not finite), ``"rhat"`` (R-hat above ``max_rhat``, or undefined),
    ``"ess"`` (min(bulk, tail) ESS below ``min_ess``, or undefined),
    ``"ci_contains_zero"``, ``"not_significant_bh"`` (not rejected by Benjamini–Hochberg
    at level ``fdr`` over the whole matrix).
``q_value``
    the Benjamini–Hochberg adjusted p-value (NaN where the p-value is not finite).
``reliable``
    ``status == "ok"``.

Analyses (:func:`standardize`, :func:`pca`, :func:`cluster`, :func:`cluster_examples`)
take a ``weights`` argument saying how much each entry counts:

* ``"status"`` (default): weight 1 for ``reliable`` entries, 0 for the others;
* ``"converged"``: weight 0 only for convergence failures (``diverged``, ``nonfinite``,
  ``rhat``, ``ess``); entries that are merely indistinguishable from zero keep weight 1,
  which is often the better choice for PCA (small χ are measurements, not failures);
* ``None``: every finite entry weight 1;
* a ``DataArray`` over (probe, component) of weights ≥ 0, e.g. ``1 / ds.se**2``.

Non-finite entries always get weight 0. Column (and row) statistics are weighted means
and standard deviations. PCA is then fit to the matrix completed by a **weighted
low-rank approximation** (Srebro & Jaakkola 2003): the rank-r-plus-mean model L
minimizing Σ w̃_ij (z_ij − L_ij)², w̃ = W / max W (found by alternating weighted least
squares, Gabriel & Zamir 1979), fills each entry in proportion to how little it is
trusted, ``Z̃ = w̃ ⊙ Z + (1 − w̃) ⊙ L``. With 0/1 weights this is the iterative-PCA
imputation of missing entries (Josse & Husson 2012, unregularized): an excluded entry is
replaced by its prediction from the rest of the matrix, so it neither pulls the
components toward itself nor (as column-mean imputation would) toward zero; a fully
trusted matrix (all weights equal) is analysed exactly as given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import sklearn
import xarray as xr
from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from statsmodels.stats.multitest import multipletests

from bayes_susc.storage.draws import atomic_write
from bayes_susc.validation import check_finite, check_fraction, check_int, check_nonnegative

#: Reasons an entry is unreliable, in the order they are checked (the first one wins).
STATUS_REASONS = (
    "diverged",
    "unstable",
    "low_acceptance",
    "stuck",
    "loss_anchor",
    "nonfinite",
    "rhat",
    "ess",
    "step_size_bias",
    "ci_contains_zero",
    "not_significant_bh",
)
#: Reasons that say the estimate itself cannot be trusted (not merely "not different from 0").
CONVERGENCE_REASONS = STATUS_REASONS[: STATUS_REASONS.index("ess") + 1]

#: Default R-hat threshold: Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021),
#: "Rank-normalization, folding, and localization: an improved R-hat", recommend
#: using draws only when the rank-normalized split R-hat is below 1.01.
DEFAULT_MAX_RHAT = 1.01
#: Default minimum of min(bulk ESS, tail ESS): the interval-coverage study of this
#: package (``diagnostics/``) finds nominal coverage of χ intervals from ESS ≈ 100.
#: Vehtari et al. (2021) recommend a stricter ESS > 400 (100 per chain with 4 chains)
#: before trusting R-hat and MCSE themselves; pass ``min_ess=400`` to follow them.
DEFAULT_MIN_ESS = 100.0
#: Default minimum of kept draws pooled over a component's chains. The coverage study
#: (``python -m diagnostics.coverage``, regimes over eight problems, chains from w*)
#: finds intervals of entries with ESS ≥ 100 covering 0.946 [0.937, 0.955] at 4 × 200
#: draws but 0.907 [0.892, 0.920] at 4 × 100: from so few draws the ESS itself is
#: overestimated often enough that "ESS ≥ 100" no longer guarantees coverage.
DEFAULT_MIN_DRAWS = 800
#: Default false-discovery rate for Benjamini–Hochberg across the whole matrix.
DEFAULT_FDR = 0.05

_REQUIRED = ("chi", "se", "ci_low", "ci_high", "p_value", "rhat", "num_diverged_chains")
_DIMS = ("probe", "component")

Weights = Literal["status", "converged"] | xr.DataArray | None
ClusterMethod = Literal["kmeans", "agglomerative", "spectral"]


# --------------------------------------------------------------------------------------
# Building and judging
# --------------------------------------------------------------------------------------


def build_response_matrix(
    runs: Mapping[str, Any],
    *,
    min_ess: float = DEFAULT_MIN_ESS,
    max_rhat: float = DEFAULT_MAX_RHAT,
    fdr: float = DEFAULT_FDR,
    min_draws: int = DEFAULT_MIN_DRAWS,
    **estimate_kwargs: Any,
) -> xr.Dataset:
    """Estimate χ with intervals for every (probe, component) pair and judge each entry.

    Args:
        runs: component name → that component's sampling run (InferenceData/DataTree
            from :func:`bayes_susc.sample`); all runs must share the same probe items.
            Runs streamed to stores (``sample(..., store=...)``) are read one component
            and one block of ``probe_chunk`` probe items at a time, never whole.
        min_ess: smallest acceptable min(bulk ESS, tail ESS) (see :func:`assign_status`).
        max_rhat: largest acceptable rank-normalized split R-hat.
        fdr: Benjamini–Hochberg false-discovery rate across the matrix.
        min_draws: fewest kept draws, pooled over chains, for an entry to pass ``ess``.
        **estimate_kwargs: passed to :func:`bayes_susc.estimation.susceptibility.estimate_many`
            (``method``, ``confidence``, seeds, ``probe_chunk``, ...).

    Returns:
        The response matrix with ``status``, ``q_value`` and ``reliable`` added.
    """
    check_thresholds(min_ess, max_rhat, fdr, min_draws)  # fail before any (slow) estimation
    from bayes_susc.estimation.susceptibility import estimate_many

    ds = estimate_many(runs, **estimate_kwargs)
    return assign_status(ds, min_ess=min_ess, max_rhat=max_rhat, fdr=fdr, min_draws=min_draws)


def assign_status(
    ds: xr.Dataset,
    *,
    min_ess: float = DEFAULT_MIN_ESS,
    max_rhat: float = DEFAULT_MAX_RHAT,
    fdr: float = DEFAULT_FDR,
    min_draws: int = DEFAULT_MIN_DRAWS,
) -> xr.Dataset:
    """Add ``status``, ``q_value`` and ``reliable`` to a response matrix.

    Checks run in the order of :data:`STATUS_REASONS`; an entry's status is ``"ok"`` or
    the *first* check it fails:

    1. ``"diverged"``: ``num_diverged_chains`` of its component is not 0 (or unknown).
    2. ``"unstable"``: the matrix holds ``unstable`` (over ``component``, from
       :mod:`bayes_susc.checks.stability`) and it is True: the kernel's step is beyond
       its stability limit on the component's stiffest curvature, so the chains sample
       another distribution even when nothing diverges.
    3. ``"low_acceptance"``: the matrix holds ``low_acceptance`` (over ``component``,
       from :func:`bayes_susc.checks.stability.check_langevin_acceptance`) and it is
       True: MALA would accept the kernel's Langevin move less often than the healthy
       range allows, so the discretization distorts the target even below the stability
       limit.
    4. ``"stuck"``: the matrix holds ``stuck`` (over ``component``: a chain that never
       moves, :func:`bayes_susc.checks.health.stuck_chains`) and it is True.
    5. ``"loss_anchor"``: the matrix holds ``loss_anchor`` (over ``component``) and it
       is True: the eval loss settled far above L(w*), beyond what a local posterior
       allows (the ``loss_anchor`` check of :mod:`bayes_susc.checks.health`).
    6. ``"nonfinite"``: ``chi``, ``se``, ``ci_low``, ``ci_high`` or ``p_value`` is NaN/inf.
    7. ``"rhat"``: ``rhat > max_rhat`` or R-hat is NaN. Default 1.01 (Vehtari et al. 2021).
    8. ``"ess"``: ``min(ess_bulk, ess_tail) < min_ess`` or NaN (a lone ``ess`` variable is
       used when the two are absent), or the component kept fewer than ``min_draws``
       draws pooled over its chains (``num_draws``, when the matrix holds it). Defaults
       100 and 800: the package's coverage study finds nominal interval coverage from
       ESS ≈ 100 at 4 × 200 draws, and undercoverage at 4 × 100 even where ESS ≥ 100.
    9. ``"step_size_bias"``: the matrix holds ``bias_exceeds_interval`` (from
       :func:`bayes_susc.checks.step_size_bias.attach_bias`) and it is True: the estimated
       step-size bias is larger than the entry's interval half-width.
    10. ``"ci_contains_zero"``: ``ci_low <= 0 <= ci_high``.
    11. ``"not_significant_bh"``: not rejected by Benjamini–Hochberg at level ``fdr``
       (``statsmodels`` ``multipletests(method="fdr_bh")``).

    The Benjamini–Hochberg family is every entry with finite estimates (all entries not
    ``"nonfinite"``), whatever its convergence verdict: the number of hypotheses must
    not depend on which entries happened to converge. ``q_value`` holds the adjusted
    p-values (NaN outside the family). The thresholds are recorded in ``attrs``; when
    ``ess_bulk`` and ``ess_tail`` are present, ``ess`` = min(bulk, tail) is added
    (DESIGN.md §3 lists ``ess``).

    Raises:
        ValueError: a threshold is out of range, a variable is missing, dimensions are not
            (probe, component), or a finite p-value lies outside [0, 1].
    """
    min_ess, max_rhat, fdr, min_draws = check_thresholds(min_ess, max_rhat, fdr, min_draws)
    _check_matrix(ds)
    ess = _ess(ds)

    chi = ds["chi"]
    template = chi.transpose(*_DIMS)
    n_div = ds["num_diverged_chains"]
    diverged = ~(n_div == 0)  # NaN (unknown) counts as diverged
    nonfinite = ~(
        np.isfinite(ds["chi"])
        & np.isfinite(ds["se"])
        & np.isfinite(ds["ci_low"])
        & np.isfinite(ds["ci_high"])
        & np.isfinite(ds["p_value"])
    )
    bad_rhat = ~(ds["rhat"] <= max_rhat)  # NaN R-hat is a failure too
    bad_ess = ~(ess >= min_ess)
    if "num_draws" in ds:
        bad_ess = bad_ess | (ds["num_draws"] < min_draws)
    contains_zero = (ds["ci_low"] <= 0) & (ds["ci_high"] >= 0)
    biased = ds["bias_exceeds_interval"] if "bias_exceeds_interval" in ds else xr.zeros_like(chi)
    unstable = ds["unstable"] if "unstable" in ds else xr.zeros_like(chi)
    low_acceptance = ds["low_acceptance"] if "low_acceptance" in ds else xr.zeros_like(chi)
    stuck = ds["stuck"] if "stuck" in ds else xr.zeros_like(chi)
    far = ds["loss_anchor"] if "loss_anchor" in ds else xr.zeros_like(chi)

    p = ds["p_value"].broadcast_like(template).transpose(*_DIMS).values.astype(float)
    family = ~nonfinite.broadcast_like(template).transpose(*_DIMS).values
    p_fam = p[family]
    if np.any((p_fam < 0) | (p_fam > 1)):
        raise ValueError(
            "p_value must lie in [0, 1] where finite, got values in "
            f"[{p_fam.min()!r}, {p_fam.max()!r}]"
        )
    q = np.full(p.shape, np.nan)
    reject = np.zeros(p.shape, dtype=bool)
    if p_fam.size:
        rej, q_fam, _, _ = multipletests(p_fam, alpha=fdr, method="fdr_bh")
        q[family] = q_fam
        reject[family] = rej
    not_sig = xr.DataArray(~reject, dims=_DIMS, coords=template.coords)

    conds = [
        c.broadcast_like(template).transpose(*_DIMS).values.astype(bool)
        for c in (
            diverged,
            unstable,
            low_acceptance,
            stuck,
            far,
            nonfinite,
            bad_rhat,
            bad_ess,
            biased,
            contains_zero,
            not_sig,
        )
    ]
    names = np.array(("ok",) + STATUS_REASONS)
    status = names[np.select(conds, list(range(1, len(names))), default=0)]

    out = ds.copy()
    if "ess_bulk" in ds and "ess_tail" in ds:
        out["ess"] = ess
        out["ess"].attrs["description"] = "min(bulk ESS, tail ESS), the value judged"
    out["status"] = (_DIMS, status)
    out["status"].attrs["description"] = "'ok' or the first failed check among: " + ", ".join(
        STATUS_REASONS
    )
    out["q_value"] = (_DIMS, q)
    out["q_value"].attrs["description"] = "Benjamini-Hochberg adjusted p-value"
    out["reliable"] = (_DIMS, status == "ok")
    out.attrs.update(
        {
            "min_ess": min_ess,
            "max_rhat": max_rhat,
            "fdr": fdr,
            "min_draws": min_draws,
            "status_reasons": " ".join(STATUS_REASONS),
        }
    )
    return out


def check_thresholds(
    min_ess: Any, max_rhat: Any, fdr: Any, min_draws: Any = DEFAULT_MIN_DRAWS
) -> tuple[float, float, float, int]:
    """Check the status thresholds of :func:`assign_status`: min_ess >= 0, max_rhat >= 1,
    fdr in (0, 1], min_draws an integer >= 0. Returns them (floats, then the integer);
    raises ValueError naming the argument."""
    min_draws = check_int("min_draws", min_draws, minimum=0)
    min_ess = check_nonnegative("min_ess", min_ess)
    max_rhat = check_finite("max_rhat", max_rhat)
    if max_rhat < 1.0:
        raise ValueError(
            f"max_rhat must be >= 1 (R-hat is about 1 at convergence), got {max_rhat!r}"
        )
    fdr = check_fraction("fdr", fdr, open_low=True)
    return min_ess, max_rhat, fdr, min_draws


def _check_matrix(ds: Any) -> None:
    if not isinstance(ds, xr.Dataset):
        raise TypeError(
            f"ds must be an xarray.Dataset (a response matrix), got {type(ds).__name__}"
        )
    missing = [v for v in _REQUIRED if v not in ds]
    if "ess" not in ds and not ("ess_bulk" in ds and "ess_tail" in ds):
        missing.append("ess_bulk/ess_tail (or ess)")
    if missing:
        raise ValueError(
            f"ds is missing variable(s) {missing}; a response matrix from "
            "bayes_susc.estimation.susceptibility.estimate_many has them"
        )
    if set(ds["chi"].dims) != set(_DIMS):
        raise ValueError(f"ds['chi'] must have dims {_DIMS}, got {ds['chi'].dims}")


def _ess(ds: xr.Dataset) -> xr.DataArray:
    if "ess_bulk" in ds and "ess_tail" in ds:
        # NaN-propagating minimum: an undefined ESS fails the check.
        return xr.where(ds["ess_bulk"] < ds["ess_tail"], ds["ess_bulk"], ds["ess_tail"]).where(
            np.isfinite(ds["ess_bulk"]) & np.isfinite(ds["ess_tail"])
        )
    return ds["ess"]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def save_response_matrix(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a response matrix to netCDF-4 atomically (temporary file, then rename).

    Strings (``status``, token coordinates) are stored as netCDF strings and booleans as
    flagged integers; :func:`load_response_matrix` gives back an identical Dataset.
    Attributes must be netCDF-compatible (strings, numbers, lists of numbers).
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds must be an xarray.Dataset, got {type(ds).__name__}")
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))


def load_response_matrix(path: str | os.PathLike) -> xr.Dataset:
    """Read a file written by :func:`save_response_matrix` fully into memory (file closed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no response matrix file at {path}")
    with xr.open_dataset(path, engine="netcdf4") as f:
        ds = f.load()
    for name in ds.variables:
        ds[name].encoding = {}
    return ds


# --------------------------------------------------------------------------------------
# Weights and standardization
# --------------------------------------------------------------------------------------


def entry_weights(ds: xr.Dataset | xr.DataArray, weights: Weights = "status", *, var: str = "chi"):
    """Per-entry weights (probe, component) for the analyses; 0 where the value is not finite.

    See the module docstring for the meaning of ``"status"``, ``"converged"``, ``None``
    and a DataArray of weights.
    """
    x = _values(ds, var)
    finite = np.isfinite(x.values)
    if weights is None:
        w = np.ones(x.shape)
    elif isinstance(weights, str):
        if not isinstance(ds, xr.Dataset) or ("status" not in ds and "reliable" not in ds):
            raise ValueError(
                f"weights={weights!r} needs a 'status' (or 'reliable') variable: call "
                "assign_status first, or pass weights=None"
            )
        if weights == "status":
            ok = ds["reliable"] if "reliable" in ds else ds["status"] == "ok"
        elif weights == "converged":
            if "status" not in ds:
                raise ValueError("weights='converged' needs the 'status' variable")
            ok = ~ds["status"].isin(list(CONVERGENCE_REASONS))
        else:
            raise ValueError(
                f"weights must be 'status', 'converged', None or a DataArray, got {weights!r}"
            )
        w = ok.broadcast_like(x).transpose(*_DIMS).values.astype(float)
    elif isinstance(weights, xr.DataArray):
        if not set(weights.dims) <= set(_DIMS):
            raise ValueError(f"weights must have dims within {_DIMS}, got {weights.dims}")
        w = weights.broadcast_like(x).transpose(*_DIMS).values.astype(float)
        if np.any(w[finite] < 0) or np.any(np.isnan(w[finite])):
            raise ValueError("weights must be >= 0 (and not NaN) on every finite entry")
        if np.any(np.isinf(w[finite])):
            raise ValueError("weights must be finite; clip 1/se**2 where se is 0")
    else:
        raise TypeError(
            "weights must be 'status', 'converged', None or an xarray.DataArray, got "
            f"{type(weights).__name__}"
        )
    w = np.where(finite, np.nan_to_num(w, nan=0.0), 0.0)
    return xr.DataArray(w, dims=_DIMS, coords=x.coords, name="weight")


def standardize(
    ds: xr.Dataset | xr.DataArray,
    *,
    columns: bool = True,
    center_rows: bool = False,
    var: str = "chi",
    weights: Weights = "status",
) -> xr.DataArray:
    """Per-column z-scoring and optional per-row centering (the published recipes).

    Columns (components) are centered by their weighted mean and divided by their
    weighted standard deviation (``ddof=0``, as scikit-learn's ``StandardScaler``; a
    constant column is only centered). Then, with ``center_rows``, each row (probe) has
    its weighted mean over components subtracted. Means and scales come from entries of
    weight > 0 only; entries of weight 0 (excluded, or not finite) are NaN in the result.

    Args:
        ds: a response matrix (or a (probe, component) DataArray with ``weights=None`` or
            a DataArray of weights).
        columns: z-score each column.
        center_rows: subtract each row's mean after the column step.
        var: the variable of ``ds`` to standardize.
        weights: see the module docstring; ``"status"`` uses only reliable entries.

    Returns:
        DataArray (probe, component) with the coordinates of ``ds``.
    """
    x = _values(ds, var)
    w = entry_weights(ds, weights, var=var).values
    z = _standardize_values(x.values, w, columns=bool(columns), center_rows=bool(center_rows))
    out = xr.DataArray(z, dims=_DIMS, coords=x.coords, name=f"{x.name or var}_standardized")
    out.attrs.update(
        {
            "columns": int(bool(columns)),
            "center_rows": int(bool(center_rows)),
            "weights": _wname(weights),
        }
    )
    return out


def _values(ds: xr.Dataset | xr.DataArray, var: str) -> xr.DataArray:
    if isinstance(ds, xr.Dataset):
        if var not in ds:
            raise ValueError(
                f"var {var!r} is not a variable of ds; variables: {list(ds.data_vars)}"
            )
        x = ds[var]
    elif isinstance(ds, xr.DataArray):
        x = ds
    else:
        raise TypeError(f"ds must be an xarray Dataset or DataArray, got {type(ds).__name__}")
    if set(x.dims) != set(_DIMS):
        raise ValueError(f"{var} must have dims {_DIMS}, got {x.dims}")
    return x.transpose(*_DIMS).astype(float)


def _wname(weights: Weights) -> str:
    return "none" if weights is None else weights if isinstance(weights, str) else "custom"


def _wmean(x: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    total = w.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w * np.where(w > 0, x, 0.0)).sum(axis=axis) / total, np.nan)


def _standardize_values(
    x: np.ndarray, w: np.ndarray, *, columns: bool, center_rows: bool
) -> np.ndarray:
    z = np.where(w > 0, x, np.nan)
    if columns:
        mean = _wmean(z, w, axis=0)
        var = _wmean((z - mean) ** 2, w, axis=0)
        scale = np.sqrt(var)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        z = (z - mean) / scale
    if center_rows:
        z = z - _wmean(z, w, axis=1)[:, None]
    return np.where(w > 0, z, np.nan)


# --------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------


def pca(
    ds: xr.Dataset,
    n_components: int = 3,
    *,
    standardize_columns: bool = True,
    center_rows: bool = False,
    weights: Weights = "status",
    var: str = "chi",
    impute_rank: int | None = None,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> xr.Dataset:
    """Principal components of the (standardized) response matrix, down-weighting entries.

    The matrix is standardized (:func:`standardize`), entries of weight < max weight are
    filled in by the weighted rank-``impute_rank`` fit described in the module
    docstring, and scikit-learn's ``PCA`` is fit to the completed matrix. Probe rows (or
    component columns) with no entry of positive weight are left out: their scores (or
    loadings) are NaN.

    Args:
        ds: a response matrix (with ``status`` unless ``weights`` is None or a DataArray).
        n_components: number of principal components.
        standardize_columns: z-score each component's column first (recommended: heads
            differ in overall scale).
        center_rows: subtract each probe's mean over components (after the column step).
        weights: ``"status"`` (reliable entries only, default), ``"converged"``, ``None``
            or a DataArray of weights ≥ 0 (e.g. ``1 / ds.se**2``).
        var: the variable analysed.
        impute_rank: rank of the fill-in model; default ``n_components``.
        max_iter: stopping rule of the weighted fit: at most this many iterations.
        tol: stopping rule of the weighted fit: the relative change of the completed
            matrix between iterations below which it stops.

    Returns:
        Dataset with ``scores`` (probe, pc), ``loadings`` (component, pc; unit-norm
        principal axes), ``explained_variance`` and ``explained_variance_ratio`` (pc; of
        the completed matrix, so filled-in entries, which lie on the rank-``impute_rank``
        fit, slightly raise the leading ratios), ``matrix`` (probe, component: the
        completed standardized matrix PCA was fit on), ``weight`` (probe, component) and
        ``used`` (probe); probe and component coordinates of ``ds``; ``pc`` = 1, 2, ...
    """
    n_components = check_int("n_components", n_components, minimum=1)
    max_iter = check_int("max_iter", max_iter, minimum=0)
    tol = check_nonnegative("tol", tol)
    rank = n_components if impute_rank is None else check_int("impute_rank", impute_rank, minimum=1)
    x = _values(ds, var)
    w = entry_weights(ds, weights, var=var).values
    z = _standardize_values(
        x.values, w, columns=bool(standardize_columns), center_rows=bool(center_rows)
    )
    rows = w.sum(axis=1) > 0
    cols = w.sum(axis=0) > 0
    n_rows, n_cols = int(rows.sum()), int(cols.sum())
    if n_components > min(n_rows, n_cols):
        raise ValueError(
            f"n_components must be <= min(usable probes, usable components) = "
            f"min({n_rows}, {n_cols}), got {n_components}; fewer entries have positive weight "
            "than the request needs"
        )
    zc, wc = z[np.ix_(rows, cols)], w[np.ix_(rows, cols)]
    completed, n_iter = _weighted_low_rank_fill(zc, wc, min(rank, n_rows, n_cols), max_iter, tol)

    model = PCA(n_components=n_components, svd_solver=_pca_solver(n_rows, n_cols)).fit(completed)
    scores = np.full((x.sizes["probe"], n_components), np.nan)
    scores[rows] = model.transform(completed)
    loadings = np.full((x.sizes["component"], n_components), np.nan)
    loadings[cols] = model.components_.T
    matrix = np.full(x.shape, np.nan)
    matrix[np.ix_(rows, cols)] = completed

    pc = np.arange(1, n_components + 1)
    probe_coords = {k: v for k, v in x.coords.items() if v.dims == ("probe",)}
    comp_coords = {k: v for k, v in x.coords.items() if v.dims == ("component",)}
    out = xr.Dataset(
        {
            "scores": (("probe", "pc"), scores),
            "loadings": (("component", "pc"), loadings),
            "explained_variance": ("pc", model.explained_variance_),
            "explained_variance_ratio": ("pc", model.explained_variance_ratio_),
            "matrix": (_DIMS, matrix),
            "weight": (_DIMS, w),
            "used": ("probe", rows),
        },
        coords={**probe_coords, **comp_coords, "pc": pc},
        attrs={
            "var": var,
            "n_components": n_components,
            "standardize_columns": int(bool(standardize_columns)),
            "center_rows": int(bool(center_rows)),
            "weights": _wname(weights),
            "impute_rank": int(rank),
            "fit_iterations": int(n_iter),
        },
    )
    return out


def _pca_solver(n_rows: int, n_cols: int) -> str:
    """Exact PCA solvers only: the covariance eigen-solver for tall matrices (scikit-learn
    ≥ 1.5; much faster for many probes and few components), else the full SVD."""
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    return "covariance_eigh" if n_rows >= 10 * n_cols and (major, minor) >= (1, 5) else "full"


def _weighted_low_rank_fill(
    z: np.ndarray, w: np.ndarray, rank: int, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    """Weighted rank-``rank`` (+ column mean) fit by alternating least squares; the fill.

    Minimizes Σ w̃_ij (z_ij − μ_j − u_iᵀv_j)² (w̃ = w / max w) by alternating weighted
    least squares over the row factors u and the column factors (μ, v), started from the
    SVD of the column-mean-imputed matrix, and returns ``w̃ ⊙ z + (1 − w̃) ⊙ L``, which
    is the fixed point of the EM iteration of Srebro & Jaakkola (2003) (ALS reaches it
    in far fewer iterations when weights vary). ``z`` may be NaN where ``w == 0``; with
    all weights equal ``z`` is returned as is.
    """
    wn = w / w.max()
    if np.all(wn == 1.0):
        return z.copy(), 0
    n, m = z.shape
    target = np.where(wn > 0, z, 0.0)
    col_mean = np.nan_to_num(_wmean(z, w, axis=0))
    # Start: column-mean imputation, each entry pulled to its column mean as much as it
    # is distrusted.
    filled = wn * target + (1.0 - wn) * col_mean
    mu = filled.mean(axis=0)
    v = np.column_stack([mu, _principal_axes(filled - mu, rank)])  # (m, 1 + rank)
    wt = wn * target
    it, change = 0, np.inf
    while it < max_iter and change >= tol:
        it += 1
        vr = v[:, 1:]
        a = (wn @ np.einsum("jk,jl->jkl", vr, vr).reshape(m, -1)).reshape(n, rank, rank)
        b = (wn * (target - v[:, 0])) @ vr
        u = _ridge_solve(a, b)
        up = np.column_stack([np.ones(n), u])
        a = (wn.T @ np.einsum("ik,il->ikl", up, up).reshape(n, -1)).reshape(m, rank + 1, rank + 1)
        v = _ridge_solve(a, wt.T @ up)
        new = wt + (1.0 - wn) * (up @ v.T)
        change = np.linalg.norm(new - filled) / max(np.linalg.norm(filled), np.finfo(float).tiny)
        filled = new
    if max_iter > 0 and change >= tol:
        warnings.warn(
            f"weighted low-rank fit did not converge in max_iter={max_iter} iterations "
            f"(last relative change {change:.2e} >= tol={tol:g}); raise max_iter, or lower "
            "impute_rank",
            ConvergenceWarning,
            stacklevel=3,
        )
    return filled, it


def _principal_axes(xc: np.ndarray, rank: int) -> np.ndarray:
    """Leading ``rank`` right singular vectors of ``xc`` times their singular values."""
    if xc.shape[0] >= xc.shape[1]:  # tall: eigen-decompose the small Gram matrix
        evals, evecs = np.linalg.eigh(xc.T @ xc)
        top = np.argsort(evals)[::-1][:rank]
        return evecs[:, top] * np.sqrt(np.clip(evals[top], 0.0, None))
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return vt[:rank].T * s[:rank]


def _ridge_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve the batched normal equations a x = b with a tiny relative ridge.

    The ridge only matters for rows (columns) with fewer trusted entries than unknowns,
    whose factors it keeps finite and small.
    """
    k = a.shape[-1]
    scale = np.trace(a, axis1=1, axis2=2) / k
    ridge = 1e-10 * np.where(scale > 0, scale, 1.0)
    a = a + ridge[:, None, None] * np.eye(k)
    return np.linalg.solve(a, b[..., None])[..., 0]


# --------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------


def cluster(
    ds: xr.Dataset,
    n_clusters: int = 3,
    *,
    method: ClusterMethod = "kmeans",
    on: Literal["pca", "standardized"] = "pca",
    n_components: int = 3,
    random_state: int = 0,
    n_neighbors: int = 10,
    **pca_kwargs: Any,
) -> xr.DataArray:
    """Cluster probe items by their response profiles.

    Args:
        ds: a :func:`pca` result, or a response matrix (then :func:`pca` is run first
            with ``n_components`` and ``pca_kwargs``, e.g. ``weights``).
        n_clusters: number of clusters.
        method: ``"kmeans"`` (k-means++, 10 restarts), ``"agglomerative"`` (Ward
            linkage) or ``"spectral"`` (graph-based: spectral clustering of the
            ``n_neighbors``-nearest-neighbour graph; finds non-convex groups).
        on: cluster the PCA ``scores`` (``"pca"``) or the completed standardized rows
            (``"standardized"``, all components).
        random_state: seed for k-means and spectral clustering.

    Returns:
        Integer labels over ``probe`` with the probe coordinates; −1 marks probes left
        out (no entry of positive weight). Clusters are numbered by decreasing size.
    """
    n_clusters = check_int("n_clusters", n_clusters, minimum=1)
    n_neighbors = check_int("n_neighbors", n_neighbors, minimum=1)
    if method not in ("kmeans", "agglomerative", "spectral"):
        raise ValueError(f"method must be 'kmeans', 'agglomerative' or 'spectral', got {method!r}")
    if on not in ("pca", "standardized"):
        raise ValueError(f"on must be 'pca' or 'standardized', got {on!r}")
    res = ds if _is_pca(ds) else pca(ds, n_components, **pca_kwargs)
    feats, rows = _features(res, on)
    n = int(rows.sum())
    if n_clusters > n:
        raise ValueError(
            f"n_clusters must be <= the number of usable probes ({n}), got {n_clusters}"
        )
    if method == "kmeans":
        model = KMeans(n_clusters=n_clusters, n_init=10, random_state=random_state)
    elif method == "agglomerative":
        model = AgglomerativeClustering(n_clusters=n_clusters, linkage="ward")
    else:
        model = SpectralClustering(
            n_clusters=n_clusters,
            affinity="nearest_neighbors",
            n_neighbors=min(n_neighbors, n - 1),
            assign_labels="cluster_qr",
            random_state=random_state,
        )
    raw = model.fit_predict(feats[rows])
    labels = np.full(rows.shape, -1, dtype=int)
    labels[rows] = _relabel_by_size(raw)
    coords = {k: v for k, v in res.coords.items() if v.dims == ("probe",)}
    return xr.DataArray(
        labels,
        dims=("probe",),
        coords=coords,
        name="cluster",
        attrs={"method": method, "on": on, "n_clusters": n_clusters},
    )


def _is_pca(ds: Any) -> bool:
    return isinstance(ds, xr.Dataset) and "scores" in ds and "loadings" in ds


def _features(res: xr.Dataset, on: str) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(res["used"].values, dtype=bool)
    if on == "pca":
        feats = res["scores"].transpose("probe", "pc").values
    else:
        m = res["matrix"].transpose(*_DIMS).values
        feats = m[:, np.isfinite(m[rows]).all(axis=0)] if rows.any() else m
    return feats, rows


def _relabel_by_size(raw: np.ndarray) -> np.ndarray:
    """Number clusters 0, 1, ... by decreasing size (ties: first appearance)."""
    uniq, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda k: (-counts[k], first[k]))
    mapping = {uniq[k]: new for new, k in enumerate(order)}
    return np.array([mapping[r] for r in raw], dtype=int)


def cluster_examples(
    ds: xr.Dataset,
    labels: xr.DataArray,
    k: int = 5,
    *,
    context: int = 8,
    include_noise: bool = False,
) -> pd.DataFrame:
    """The ``k`` most typical probe items of each cluster, with their text in context.

    Typical = closest to the cluster's centroid, in PCA scores when ``ds`` is a
    :func:`pca` result, otherwise in the standardized response matrix (reliable entries;
    excluded entries at their column mean, i.e. 0).

    When ``ds`` has a ``token`` probe coordinate, ``context`` holds the token with up to
    ``context`` neighbouring tokens each side, taken from probes of the same ``sequence``
    (and ``dataset``) ordered by ``position``; the token itself is marked ``⟦…⟧``.

    Returns:
        DataFrame with one row per example: ``cluster``, ``rank`` (0 = closest),
        ``probe``, ``distance``, every probe coordinate, and ``context`` if tokens exist.
    """
    k = check_int("k", k, minimum=1)
    context = check_int("context", context, minimum=0)
    if not isinstance(labels, xr.DataArray) or labels.dims != ("probe",):
        raise ValueError("labels must be a DataArray over 'probe' (from cluster())")
    if _is_pca(ds):
        feats = ds["scores"].transpose("probe", "pc").values
    else:
        has_status = isinstance(ds, xr.Dataset) and ("status" in ds or "reliable" in ds)
        feats = standardize(ds, weights="status" if has_status else None).values
        feats = np.nan_to_num(feats, nan=0.0)
    n_probe = feats.shape[0]
    lab = labels.values
    if lab.shape != (n_probe,):
        raise ValueError(f"labels must have one entry per probe ({n_probe}), got {lab.shape}")
    probe_coords = {
        name: np.asarray(c.values) for name, c in ds.coords.items() if c.dims == ("probe",)
    }
    texts = _contexts(probe_coords, context) if "token" in probe_coords else None

    records = []
    for c in sorted(set(lab.tolist())):
        if c < 0 and not include_noise:
            continue
        idx = np.flatnonzero(lab == c)
        f = feats[idx]
        ok = np.isfinite(f).all(axis=1)
        centroid = f[ok].mean(axis=0) if ok.any() else np.zeros(f.shape[1])
        dist = np.where(ok, np.linalg.norm(np.where(ok[:, None], f, 0) - centroid, axis=1), np.inf)
        for rank, j in enumerate(np.argsort(dist, kind="stable")[:k]):
            i = idx[j]
            rec = {"cluster": int(c), "rank": rank, "distance": float(dist[j])}
            for name, vals in probe_coords.items():
                v = vals[i]
                rec[name] = v.item() if hasattr(v, "item") else v
            if texts is not None:
                rec["context"] = texts[i]
            records.append(rec)
    columns = ["cluster", "rank", "probe", "distance"]
    columns += [c for c in probe_coords if c != "probe"]
    if texts is not None:
        columns.append("context")
    return pd.DataFrame.from_records(records, columns=columns)


def _contexts(coords: Mapping[str, np.ndarray], width: int) -> list[str]:
    tokens = [str(t) for t in coords["token"]]
    n = len(tokens)
    if "position" not in coords:
        return [f"⟦{t}⟧" for t in tokens]
    pos = np.asarray(coords["position"])
    keys = [name for name in ("dataset", "sequence") if name in coords]
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        groups.setdefault(tuple(str(coords[name][i]) for name in keys), []).append(i)
    out = [""] * n
    for members in groups.values():
        members = sorted(members, key=lambda i: pos[i])
        mpos = np.array([pos[i] for i in members])
        for j, i in enumerate(members):
            lo = np.searchsorted(mpos, pos[i] - width, side="left")
            hi = np.searchsorted(mpos, pos[i] + width, side="right")
            before = "".join(tokens[m] for m in members[lo:j])
            after = "".join(tokens[m] for m in members[j + 1 : hi])
            out[i] = f"{before}⟦{tokens[i]}⟧{after}"
    return out

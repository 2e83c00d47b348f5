"""Trace health checks: is one component's sampling run fit to estimate susceptibilities?

:func:`check_health` reads one sampling result (the output of :func:`bayes_susc.sample`)
and returns a :class:`HealthReport` of :class:`Verdict` objects, one per check. Each
verdict has a status (``"ok"``, ``"warn"`` or ``"fail"``), the number judged, a
message, and the action it suggests (STYLE.md: every verdict we print ends with the
action it suggests). :func:`check_run_health` does the same for every component of a
run and adds an overall table.

The checks (names as in :attr:`Verdict.name`):

``divergences``
    Fraction of chains that went non-finite (``sample_stats.diverged``). Any → fail,
    "lower step_size (or raise γ)". The other checks use the surviving chains only.
``stuck``
    Chains that never move: φ identical at every kept draw, or a MALA run's recorded
    acceptance below 1 % (:func:`stuck_chains`). Any → fail, "lower step_size". The
    pipeline folds it into the entries' status (``stuck``).
``loss_trend``
    Does the evaluation loss level off? The mean of the last quarter of the kept
    ``eval_loss`` draws is compared with the mean of the third quarter, pooled over
    chains, as a z-score ``(m4 − m3) / SE``; the SE is autocorrelation-aware (each
    chain's own MCSE of each quarter, from its ESS). ``|z| > trend_z`` (3) warns,
    ``|z| > trend_z_fail`` (5) fails. A steady trend saturates the z-score near
    2.75·sqrt(chains) (its own spread inflates the quarters' MCSE), so with 4 chains a
    clear rise scores 5–6. Rising: "raise γ or lower nβ, or burn in longer".
    (The minibatch ``loss`` is not used here: all chains share each minibatch, so its
    batch-to-batch noise is common to the chains and a pooled SE would be too small.)
``loss_anchor``
    Does the loss settle *above* L(w*)? Near a local minimum the stationary mean of
    L_E − L_E(w*) is ≈ ½ tr(H_E Σ) > 0, at most d/(2nβ) nats (Σ = (nβH + γI)⁻¹, H ⪰ 0).
    A last-half mean more than ``anchor_z`` SEs *and* ``anchor_rise_factor`` (3) times
    d/(2nβ) above it fails: the chains left w*'s basin (or the step is too large); the
    pipeline folds that into the entries' status (``loss_anchor``).
    A last-half mean more than ``anchor_z`` SEs
    below ``eval_loss_anchor`` warns: w* is not a local minimum of the loss (the chains
    found lower loss nearby), so the local posterior is not centred where it should be.
``spikes``
    Robust z-scores ``|Δ − median(Δ)| / (1.4826·MAD(Δ))`` of the draw-to-draw increments
    Δ of each variable in ``spike_vars``, pooled over chains. Any above ``spike_z``
    (20) warns, as does a non-finite value in a chain that is not flagged as diverged
    (fail). Action: "lower step_size". Why 20 and not 10: near a minimum the loss is
    ½δᵀHδ, χ²-like with few degrees of freedom for a small component, so its increments
    are heavy-tailed; healthy full-batch SGLD runs of a 3-weight linear–Gaussian
    component (4×400 draws, 8 seeds) reached a largest robust z of 6.4–15. For
    components of hundreds of weights the loss is near-Gaussian and 10 would do.
``rhat``
    Rank-normalized split R-hat (:func:`bayes_susc.estimation.convergence.rhat`, as ArviZ) of
    ``eval_loss`` and of the minibatch ``loss`` over the surviving chains; the larger is
    judged. ``> rhat_warn`` (1.01, Vehtari et al. 2021) warns, ``> rhat_fail`` (1.1,
    the older Gelman–Rubin rule) fails. Action: "run longer or raise γ".
``autocorrelation``
    Integrated autocorrelation time of φ, τ = (chains·draws) / ESS_bulk(φ), in draws
    and in kernel steps (× ``steps_per_draw``). Recommends ``steps_per_draw ≈ τ_steps``
    for roughly independent draws, and the draws per chain that reach ``target_ess``
    at the current thinning. ESS below ``target_ess`` (400: Vehtari et al.'s 100 per
    chain with 4 chains) warns, below ``min_ess`` (100: the coverage study's threshold,
    as ``response_matrix.DEFAULT_MIN_ESS``) fails.
``distance``
    ‖v − v*‖ must stay bounded: its last quarter is compared with its third quarter as
    for ``loss_trend`` (rising → "weights drifting away: raise γ"), and its root mean
    square over the last half is compared with the localization scale sqrt(dim/γ) —
    the prior's own RMS radius, which the posterior (curvature added to γ) does not
    exceed near a minimum. A ratio above ``distance_factor`` warns, above
    ``distance_factor_fail`` fails.
``mala_acceptance``
    Metropolis–Hastings acceptance probability of the SGLD move (DESIGN.md §2): the
    chance MALA would accept the very move SGLD makes. Near 1, the Langevin
    discretization barely distorts the target; low, ε is too large for the local
    curvature. The draws do not store positions, so (given the ``LocalPosterior``)
    :func:`mala_acceptance` runs a short SGLD trajectory of its own from w* on a fixed
    batch and scores every move. For a run made with the ``"mala"`` kernel the recorded
    ``acceptance_rate`` is used instead. Healthy range ``acceptance_range`` =
    [0.5, 0.99]: below → fail "step too large for this curvature: lower step_size";
    above → warn "step smaller than needed: step_size can be raised for faster
    mixing". MALA's optimal acceptance in high dimension is ≈ 0.57 (Roberts &
    Rosenthal 1998); an unadjusted SGLD run wants a higher value, since 1 − acceptance
    measures its per-step bias, hence the range.

The thresholds are the fields of one frozen :class:`HealthThresholds`, validated when it
is made, with the defaults above (also the module constants ``TREND_Z``, ``MIN_ESS``, ...);
how the ``mala_acceptance`` run is made (its ε, batch, moves and chains) is a
:class:`MalaCheck`. :func:`check_health` and :func:`check_run_health` take one of each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from bayes_susc.estimation import convergence
from bayes_susc.kernels.base import NoiseSource
from bayes_susc.kernels.mala import MALA, MALAState
from bayes_susc.storage.draws import get_group, group_names, to_jsonable
from bayes_susc.target.posterior import Batch, LocalPosterior
from bayes_susc.validation import check_finite, check_int, check_positive

__all__ = [
    "HealthReport",
    "HealthThresholds",
    "MalaCheck",
    "RunHealth",
    "Verdict",
    "check_health",
    "check_mala_acceptance",
    "check_run_health",
    "mala_acceptance",
    "stuck_chains",
]

Status = Literal["ok", "warn", "fail"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail")
_RANK = {s: i for i, s in enumerate(STATUSES)}
_NONE = "none needed"
_MAD_TO_SD = 1.4826  # MAD of a normal sample × this = its standard deviation

# Default thresholds (documented in the module docstring and in HealthThresholds).
TREND_Z = 3.0
TREND_Z_FAIL = 5.0
ANCHOR_Z = 3.0
ANCHOR_RISE_FACTOR = 3.0
SPIKE_Z = 20.0
SPIKE_VARS = ("eval_loss", "loss")
RHAT_WARN = 1.01
RHAT_FAIL = 1.1
TARGET_ESS = 400.0
MIN_ESS = 100.0
DISTANCE_FACTOR = 3.0
DISTANCE_FACTOR_FAIL = 10.0
ACCEPTANCE_RANGE = (0.5, 0.99)
MALA_MOVES = 100
#: Below this mean recorded acceptance a MALA chain counts as stuck (see :func:`stuck_chains`).
STUCK_ACCEPTANCE = 0.01


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class HealthThresholds:
    """The thresholds of every check of :func:`check_health`, validated once, here.

    The module docstring says what each check measures and where each default comes
    from. Every number must be finite and > 0, each warn threshold at most its fail
    threshold (for the ESS: ``min_ess`` <= ``target_ess``), else ``ValueError`` (a
    ``TypeError`` for a value that is not a number), naming the field.

    Attributes:
        trend_z: |z| (in standard errors) of the last- vs third-quarter mean above which
            ``loss_trend`` and the ``distance`` trend warn (default 3: a stationary chain
            exceeds it in 0.3–2 % of runs).
        trend_z_fail: |z| above which they fail (default 5).
        anchor_z: standard errors below L(w*) at which ``loss_anchor`` warns (default 3);
            also the significance a rise above L(w*) needs before it can fail.
        anchor_rise_factor: ``loss_anchor`` fails when the eval loss settles more than this
            many times d/(2nβ) nats above L(w*) (default 3): d/(2nβ) bounds the excess
            ½ tr(H Σ) of a local posterior near a minimum, Σ = (nβH + γI)⁻¹, H ⪰ 0.
        spike_z: robust z (robust SDs, median/MAD, of the draw-to-draw increments) of an
            increment counted as a spike (default 20).
        spike_vars: traces (posterior or sample_stats variables) whose increments are
            screened (default the eval and the minibatch loss); a single name is one trace.
        rhat_warn: rank-normalized split R-hat (dimensionless) above which ``rhat``
            warns (default 1.01).
        rhat_fail: R-hat above which ``rhat`` fails (default 1.1).
        target_ess: ESS of φ (in draws, summed over chains) below which
            ``autocorrelation`` warns (default 400).
        min_ess: ESS of φ below which ``autocorrelation`` fails (default 100).
        distance_factor: RMS ‖v − v*‖ in units of the localization scale sqrt(dim/γ)
            above which ``distance`` warns (default 3).
        distance_factor_fail: the same ratio above which it fails (default 10).
        acceptance_range: healthy MALA acceptance probability (low, high),
            0 <= low < high <= 1 (default (0.5, 0.99)).
    """

    trend_z: float = TREND_Z
    trend_z_fail: float = TREND_Z_FAIL
    anchor_z: float = ANCHOR_Z
    anchor_rise_factor: float = ANCHOR_RISE_FACTOR
    spike_z: float = SPIKE_Z
    spike_vars: tuple[str, ...] = SPIKE_VARS
    rhat_warn: float = RHAT_WARN
    rhat_fail: float = RHAT_FAIL
    target_ess: float = TARGET_ESS
    min_ess: float = MIN_ESS
    distance_factor: float = DISTANCE_FACTOR
    distance_factor_fail: float = DISTANCE_FACTOR_FAIL
    acceptance_range: tuple[float, float] = ACCEPTANCE_RANGE

    def __post_init__(self) -> None:
        for name in (
            "trend_z",
            "trend_z_fail",
            "anchor_z",
            "anchor_rise_factor",
            "spike_z",
            "rhat_warn",
            "rhat_fail",
            "target_ess",
            "min_ess",
            "distance_factor",
            "distance_factor_fail",
        ):
            object.__setattr__(self, name, check_positive(name, getattr(self, name)))
        for lo_name, hi_name in (
            ("trend_z", "trend_z_fail"),
            ("rhat_warn", "rhat_fail"),
            ("min_ess", "target_ess"),
            ("distance_factor", "distance_factor_fail"),
        ):
            lo, hi = getattr(self, lo_name), getattr(self, hi_name)
            if lo > hi:
                raise ValueError(f"{lo_name} must be <= {hi_name}, got {lo} > {hi}")
        object.__setattr__(self, "acceptance_range", _check_range(self.acceptance_range))
        spike_vars = self.spike_vars
        if isinstance(spike_vars, str):
            spike_vars = (spike_vars,)
        if not isinstance(spike_vars, Sequence) or not all(isinstance(v, str) for v in spike_vars):
            raise TypeError(f"spike_vars must be a sequence of variable names, got {spike_vars!r}")
        object.__setattr__(self, "spike_vars", tuple(spike_vars))


@dataclass(frozen=True)
class MalaCheck:
    """How the ``mala_acceptance`` check scores the SGLD move when :func:`check_health`
    is given the run's :class:`LocalPosterior` (see :func:`mala_acceptance`).

    Invalid values raise ``ValueError`` (``TypeError`` for a wrong type) naming the field.

    Attributes:
        step_size: ε of the scored move, in the kernel's step-size units (SGLD's Langevin
            step); ``None``: the run's recorded ``step_size``. Given, it also scores runs
            of kernels other than SGLD (an SGLD move of that size).
        batch: the fixed batch of U and ∇U: ``"first"`` (the first training batch, the
            cost of one SG step per move) or ``"full"`` (the full training set). Any
            other batch: call :func:`check_mala_acceptance` directly.
        moves: scored moves per chain (each one gradient evaluation per chain).
        chains: chains of the acceptance run; ``None``: as many as the run has.
    """

    step_size: float | None = None
    batch: Literal["first", "full"] = "first"
    moves: int = MALA_MOVES
    chains: int | None = None

    def __post_init__(self) -> None:
        if self.step_size is not None:
            object.__setattr__(self, "step_size", check_positive("step_size", self.step_size))
        if self.batch not in ("first", "full"):
            raise ValueError(f"batch must be 'first' or 'full', got {self.batch!r}")
        object.__setattr__(self, "moves", check_int("moves", self.moves, minimum=1))
        if self.chains is not None:
            object.__setattr__(self, "chains", check_int("chains", self.chains, minimum=1))


def _check_range(r: Any) -> tuple[float, float]:
    """``r`` as a (low, high) pair of probabilities, 0 <= low < high <= 1."""
    try:
        low, high = (check_finite("acceptance_range", float(v)) for v in r)
    except (TypeError, ValueError) as err:
        raise ValueError(f"acceptance_range must be two numbers (low, high), got {r!r}") from err
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"acceptance_range must satisfy 0 <= low < high <= 1, got {r!r}")
    return low, high


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Verdict:
    """The outcome of one check.

    Attributes:
        name: the check (``"divergences"``, ``"loss_trend"``, ...).
        status: ``"ok"``, ``"warn"`` or ``"fail"``.
        value: the number judged (``None`` when it could not be computed).
        message: what was found, with the numbers.
        action: what to change (``"none needed"`` when ok).
        details: further numbers (per chain, per variable, recommendations).
    """

    name: str
    status: Status
    value: float | None
    message: str
    action: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in _RANK:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def line(self) -> str:
        """``message → action``: the verdict as one sentence ending with its action."""
        return f"{self.message} → {self.action}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NumPy numbers as Python numbers, NaN/inf as ``None``)."""
        return {
            "name": self.name,
            "status": self.status,
            "value": to_jsonable(self.value),
            "message": self.message,
            "action": self.action,
            "details": to_jsonable(dict(self.details)),
        }


def _worst(statuses: Sequence[str]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default="ok")


@dataclass(frozen=True)
class HealthReport:
    """Every check of one component's run.

    Attributes:
        component: the component's name.
        verdicts: one :class:`Verdict` per check, in the order run.
        info: what was read from the run (kernel, chains, draws, steps_per_draw, ...).
    """

    component: str
    verdicts: tuple[Verdict, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(v.status != "fail" for v in self.verdicts)

    @property
    def status(self) -> Status:
        """The worst status of any check."""
        return _worst([v.status for v in self.verdicts])

    def __getitem__(self, name: str) -> Verdict:
        for v in self.verdicts:
            if v.name == name:
                return v
        raise KeyError(f"no check {name!r}; checks: {[v.name for v in self.verdicts]}")

    def __contains__(self, name: object) -> bool:
        return any(v.name == name for v in self.verdicts)

    def summary(self) -> str:
        """Plain-text table, one line per check, each ending with its suggested action."""
        head = f"component {self.component!r}"
        meta = [
            f"{self.info[k]} {k}"
            for k in ("kernel", "chains", "draws")
            if self.info.get(k) is not None
        ]
        if meta:
            head += " (" + ", ".join(meta) + ")"
        lines = [f"{head}: {self.status.upper()}"]
        width = max(len(v.name) for v in self.verdicts) if self.verdicts else 0
        for v in self.verdicts:
            lines.append(f"  {v.name:<{width}}  {v.status:<4}  {_fmt(v.value):>9}  {v.line}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: component, overall status, ok, info and every verdict."""
        return {
            "component": self.component,
            "status": self.status,
            "ok": self.ok,
            "info": to_jsonable(dict(self.info)),
            "verdicts": [v.to_dict() for v in self.verdicts],
        }


@dataclass(frozen=True)
class RunHealth:
    """Health reports of every component of a run, plus an overall table.

    Attributes:
        reports: component name → :class:`HealthReport`, in the order given.
    """

    reports: Mapping[str, HealthReport]

    @property
    def ok(self) -> bool:
        """No check of any component failed."""
        return all(r.ok for r in self.reports.values())

    @property
    def status(self) -> Status:
        return _worst([r.status for r in self.reports.values()])

    def __getitem__(self, component: str) -> HealthReport:
        return self.reports[component]

    def statuses(self) -> dict[str, Status]:
        """Component → its worst status (e.g. to attach to a response matrix)."""
        return {name: r.status for name, r in self.reports.items()}

    def table(self) -> Any:
        """``pandas.DataFrame``: one row per component, one column per check (its
        status), plus the overall ``status`` and the first suggested ``action``."""
        import pandas as pd

        rows = {}
        for name, r in self.reports.items():
            row: dict[str, Any] = {v.name: v.status for v in r.verdicts}
            row["status"] = r.status
            row["action"] = _first_action(r)
            rows[name] = row
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "component"
        return frame

    def summary(self, *, details: bool = True) -> str:
        """Overall table (status of each check per component, then the action for the
        component's worst check) and, with ``details``, every component's report."""
        checks: list[str] = []
        for r in self.reports.values():
            checks += [v.name for v in r.verdicts if v.name not in checks]
        names = list(self.reports)
        width = max([len("component")] + [len(n) for n in names])
        cols = [(c, max(len(c), 4)) for c in checks]
        header = f"{'component':<{width}}  " + "  ".join(f"{c:<{w}}" for c, w in cols)
        lines = [f"run health: {self.status.upper()}", header + "  action"]
        for name, r in self.reports.items():
            cells = [f"{(r[c].status if c in r else '-'):<{w}}" for c, w in cols]
            lines.append(f"{name:<{width}}  " + "  ".join(cells) + f"  {_first_action(r)}")
        if details:
            lines += [""] + [r.summary() + "\n" for r in self.reports.values()]
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        return self.summary(details=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "ok": self.ok,
            "components": {name: r.to_dict() for name, r in self.reports.items()},
        }


def _first_action(report: HealthReport) -> str:
    """The action of the worst check (the first one of that status)."""
    worst = report.status
    if worst == "ok":
        return _NONE
    return next(v.action for v in report.verdicts if v.status == worst)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


# ---------------------------------------------------------------------- reading a run
@dataclass
class _Run:
    component: str
    kernel: str | None
    config: dict[str, Any]
    posterior: Any
    stats: Any
    const: Any | None
    diverged: np.ndarray  # (chain,) bool
    num_chains: int
    num_draws: int

    def trace(self, name: str) -> np.ndarray | None:
        """(chain, draw) float array of a posterior or sample_stats variable, or None."""
        for group in (self.posterior, self.stats):
            if name in group.variables and group[name].dims == ("chain", "draw"):
                return np.asarray(group[name].values, dtype=float)
        return None


def _read(data: Any) -> _Run:
    groups = group_names(data)
    for needed in ("posterior", "sample_stats"):
        if needed not in groups:
            raise ValueError(
                f"data must be a sampling result with groups 'posterior' and 'sample_stats' "
                f"(the output of bayes_susc.sample), got groups {groups}"
            )
    post = get_group(data, "posterior")
    stats = get_group(data, "sample_stats")
    const = get_group(data, "constant_data") if "constant_data" in groups else None
    attrs = {**post.attrs, **stats.attrs}
    raw = attrs.get("bayes_susc_config")
    config = json.loads(raw) if isinstance(raw, str) else {}
    num_chains, num_draws = int(post.sizes["chain"]), int(post.sizes["draw"])
    if "diverged" in stats.variables:
        diverged = np.asarray(stats["diverged"].values, dtype=bool).any(axis=-1)
    else:
        diverged = np.zeros(num_chains, dtype=bool)
    return _Run(
        component=str(attrs.get("component", config.get("component", "component"))),
        kernel=attrs.get("kernel", config.get("kernel")),
        config=config,
        posterior=post,
        stats=stats,
        const=const,
        diverged=diverged,
        num_chains=num_chains,
        num_draws=num_draws,
    )


# ------------------------------------------------------------------------ statistics
def _trend(x: np.ndarray) -> dict[str, Any] | None:
    """Last-quarter minus third-quarter mean of (chain, draw) ``x``, pooled over chains,
    and its z-score (a Geweke-style comparison of adjacent quarters).

    The SE of each quarter's pooled mean combines every chain's own MCSE of that
    quarter (``convergence.mcse_mean`` per chain: split-chain ESS, so autocorrelation
    and a trend inside the quarter count, but a chain's constant offset from the others,
    which cancels in the difference, does not). The two quarters are combined as if
    independent (adjacent quarters correlate positively, so this overstates the SE of
    the difference a little). Calibration on stationary AR(1) series, 4 chains, 400
    repetitions: with τ ≤ 3 draws the z-score has SD 0.9–1.0 and exceeds 3 in ≤ 1% of
    runs; with 400 draws and τ = 19 or 99 draws, 0.7% and 3.7%; with only 100 draws
    (quarters of 25) and τ = 19 or 99, 8% and 15% — the ESS of a 25-draw quarter is
    then too rough, and such runs fail the autocorrelation check anyway. On a steady
    trend the z-score saturates near 2.75·sqrt(chains) (5.5 with 4 chains), because the
    trend inflates the quarters' own MCSE.

    None when there are fewer than 16 draws (quarters of 4 draws).
    """
    num_draws = x.shape[1]
    q = num_draws // 4
    if q < convergence.MIN_DRAWS or x.shape[0] < 1:
        return None
    x3 = x[:, num_draws - 2 * q : num_draws - q]
    x4 = x[:, num_draws - q :]
    se3, se4 = _pooled_se(x3), _pooled_se(x4)
    m3, m4 = x3.mean(axis=1), x4.mean(axis=1)
    diff = float(x4.mean() - x3.mean())
    se_diff = math.hypot(se3, se4) if math.isfinite(se3) and math.isfinite(se4) else math.nan
    if math.isnan(se_diff):
        z = math.nan  # undefined SE: not judged
    elif se_diff > 0:
        z = diff / se_diff
    else:  # constant quarters: only an exact change counts
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return {
        "z": z,
        "change": diff,
        "se": se_diff,
        "third_quarter_mean": float(m3.mean()),
        "last_quarter_mean": float(m4.mean()),
        "change_per_chain": (m4 - m3).tolist(),
    }


def _pooled_se(x: np.ndarray) -> float:
    """SE of the pooled mean of (chain, draw) ``x`` from each chain's own MCSE.

    Each chain's MCSE comes from its own (split) ESS, so a chain's offset from the
    others does not count: an offset common to two quarters cancels in their difference.
    """
    per_chain = np.asarray(convergence.mcse_mean(x.T[None]), dtype=float)  # (chain,)
    return float(np.sqrt((per_chain**2).sum()) / x.shape[0])


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Pooled mean of (chain, draw) ``x`` and its MCSE (ArviZ ``mcse_mean``)."""
    se = float(convergence.mcse_mean(x))
    return float(x.mean()), se


def _finite_chains(x: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Surviving chains whose trace is entirely finite."""
    return alive & np.isfinite(x).all(axis=1)


# ---------------------------------------------------------------------------- checks
def _check_divergences(run: _Run) -> Verdict:
    n_bad = int(run.diverged.sum())
    frac = n_bad / run.num_chains
    steps = run.config.get("diverged_at_step")
    details = {"diverged_chains": np.flatnonzero(run.diverged).tolist(), "fraction": frac}
    if steps is not None:
        details["diverged_at_step"] = steps
    if n_bad == 0:
        return Verdict(
            "divergences", "ok", 0.0, f"no chain diverged (of {run.num_chains})", _NONE, details
        )
    return Verdict(
        "divergences",
        "fail",
        frac,
        f"{n_bad} of {run.num_chains} chains diverged (went non-finite)",
        "lower step_size (or raise γ)",
        details,
    )


def stuck_chains(phi: np.ndarray, acceptance: np.ndarray | None = None) -> np.ndarray:
    """(chain,) bool: chains that never move: φ the same at every kept draw (to the last
    bit), or a recorded Metropolis acceptance rate below 1 % (a MALA chain rejecting
    nearly every proposal). A stuck chain has no variance, so the χ it contributes is 0
    and its R-hat is meaningless; the status names it ``stuck``.

    Args:
        phi: (chain, draw) φ draws (nats); NaN draws (a diverged chain) count as moving.
        acceptance: (chain, draw) recorded acceptance probabilities, or None.
    """
    phi = np.asarray(phi, dtype=float)
    with np.errstate(invalid="ignore"):
        frozen = np.all(phi == phi[:, :1], axis=1) & np.isfinite(phi).all(axis=1)
    if phi.shape[1] < 2:
        frozen[:] = False
    if acceptance is not None:
        with np.errstate(invalid="ignore"):
            frozen |= np.nanmean(np.asarray(acceptance, dtype=float), axis=1) < STUCK_ACCEPTANCE
    return frozen


def _check_stuck(run: _Run, alive: np.ndarray) -> Verdict:
    phi = run.trace("phi")
    if phi is None:
        return Verdict("stuck", "ok", None, "no φ recorded: not judged", _NONE)
    acceptance = run.trace("acceptance_rate") if run.kernel == "mala" else None
    stuck = stuck_chains(phi, acceptance) & alive
    details = {"stuck_chains": np.flatnonzero(stuck).tolist()}
    if not stuck.any():
        return Verdict("stuck", "ok", 0.0, f"every chain moves (of {run.num_chains})", _NONE)
    return Verdict(
        "stuck",
        "fail",
        float(stuck.mean()),
        f"chain(s) {details['stuck_chains']} never move (φ constant, or acceptance < "
        f"{STUCK_ACCEPTANCE:.0%})",
        "lower step_size",
        details,
    )


def _no_chains(name: str, what: str) -> Verdict:
    return Verdict(
        name,
        "fail",
        None,
        f"no chain has a finite {what} trace to judge",
        "lower step_size (or raise γ) and rerun",
    )


def _too_short(name: str, what: str, num_draws: int) -> Verdict:
    return Verdict(
        name,
        "warn",
        None,
        f"{num_draws} draws are too few to judge the {what} trend (need >= 16)",
        "keep more draws (num_draws >= 100)",
    )


def _check_loss(run: _Run, alive: np.ndarray, t: HealthThresholds) -> list[Verdict]:
    x = run.trace("eval_loss")
    if x is None:
        return []
    ok_chains = _finite_chains(x, alive)
    if not ok_chains.any():
        return [_no_chains("loss_trend", "eval_loss")]
    x = x[ok_chains]
    out = []
    tr = _trend(x)
    if tr is None:
        out.append(_too_short("loss_trend", "loss", run.num_draws))
    else:
        z = tr["z"]
        msg = f"eval loss, last vs third quarter: {tr['change']:+.3g} ({z:+.1f} SE)"
        status: Status = (
            "fail" if abs(z) > t.trend_z_fail else "warn" if abs(z) > t.trend_z else "ok"
        )
        if status == "ok":
            action = _NONE
            msg = "loss has levelled off: " + msg
        elif z > 0:
            action = "loss still rising: raise γ or lower nβ, or burn in longer"
            msg = "loss still rising: " + msg
        else:
            action = (
                "loss still falling: burn in longer; if it keeps falling, w* is not a "
                "local minimum (train it further)"
            )
            msg = "loss still falling: " + msg
        out.append(Verdict("loss_trend", status, z, msg, action, tr))

    anchor = None
    if run.const is not None and "eval_loss_anchor" in run.const.variables:
        anchor = float(run.const["eval_loss_anchor"].values)
    if anchor is not None and run.num_draws >= 2 * convergence.MIN_DRAWS:
        last = x[:, run.num_draws // 2 :]
        mean, se = _mean_se(last)
        rise = mean - anchor
        z = rise / se if se > 0 else (0.0 if rise == 0 else math.copysign(math.inf, rise))
        details = {"anchor": anchor, "last_half_mean": mean, "rise": rise, "se": se, "z": z}
        msg = f"eval loss over the last half is L(w*) {rise:+.3g} ({z:+.1f} SE)"
        dim, nbeta = run.config.get("dim"), run.config.get("nbeta")
        bound = dim / (2.0 * nbeta) if dim and nbeta else None
        details["quadratic_bound"] = bound
        if bound is not None and z > t.anchor_z and rise > t.anchor_rise_factor * bound:
            out.append(
                Verdict(
                    "loss_anchor",
                    "fail",
                    rise,
                    f"loss settles far above L(w*): {msg}, more than {t.anchor_rise_factor:g} "
                    f"x d/(2 nbeta) = {bound:.3g} nats, the most a local posterior near a "
                    "minimum allows: the chains left w*'s basin",
                    "lower step_size (or raise γ)",
                    details,
                )
            )
        elif z < -t.anchor_z:
            out.append(
                Verdict(
                    "loss_anchor",
                    "warn",
                    rise,
                    "loss settles below L(w*): " + msg,
                    "w* is not a local minimum: train w* further (or raise γ to stay local)",
                    details,
                )
            )
        else:
            out.append(Verdict("loss_anchor", "ok", rise, msg, _NONE, details))
    return out


def _check_spikes(
    run: _Run, alive: np.ndarray, spike_z: float, spike_vars: Sequence[str]
) -> Verdict:
    worst_z, per_var, nonfinite = 0.0, {}, []
    for name in spike_vars:
        x = run.trace(name)
        if x is None:
            continue
        # Non-finite values in chains the driver did not flag are a fault of their own.
        bad = alive & ~np.isfinite(x).all(axis=1)
        if bad.any():
            nonfinite.append(f"{name} (chains {np.flatnonzero(bad).tolist()})")
        inc = np.diff(x, axis=1)  # NaN after a divergence drops out below
        inc = inc[np.isfinite(inc)]
        if inc.size < 4:
            continue
        med = np.median(inc)
        dev = np.abs(inc - med)
        scale = _MAD_TO_SD * np.median(dev)
        if scale <= 0:
            scale = np.finfo(float).eps * max(float(np.abs(x[np.isfinite(x)]).max()), 1.0)
        z = dev / scale
        per_var[name] = {"max_z": float(z.max()), "num_spikes": int((z > spike_z).sum())}
        worst_z = max(worst_z, float(z.max()))
    details = {"per_variable": per_var, "nonfinite": nonfinite, "threshold": spike_z}
    if nonfinite:
        return Verdict(
            "spikes",
            "fail",
            worst_z,
            "non-finite values in chains not flagged as diverged: " + ", ".join(nonfinite),
            "lower step_size; check the loss and observables for NaN at large weights",
            details,
        )
    spiky = {k: v for k, v in per_var.items() if v["num_spikes"]}
    if spiky:
        what = ", ".join(
            f"{k}: {v['num_spikes']} (max {v['max_z']:.0f} robust SD)" for k, v in spiky.items()
        )
        return Verdict(
            "spikes",
            "warn",
            worst_z,
            f"spikes in the draw-to-draw increments above {spike_z:g} robust SD: {what}",
            "spikes: lower step_size",
            details,
        )
    return Verdict(
        "spikes",
        "ok",
        worst_z,
        f"no spikes (largest increment {worst_z:.1f} robust SD, threshold {spike_z:g})",
        _NONE,
        details,
    )


def _check_rhat(run: _Run, alive: np.ndarray, rhat_warn: float, rhat_fail: float) -> Verdict | None:
    values = {}
    for name in ("eval_loss", "loss"):
        x = run.trace(name)
        if x is None:
            continue
        x = x[_finite_chains(x, alive)]
        if x.shape[0] >= 2:
            values[name] = float(convergence.rhat(x))
    if not values:
        if run.trace("eval_loss") is None and run.trace("loss") is None:
            return None
        return Verdict(
            "rhat",
            "warn",
            None,
            "R-hat needs at least 2 surviving chains",
            "run at least 4 chains (and lower step_size if chains diverged)",
        )
    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        return Verdict(
            "rhat",
            "warn",
            None,
            "R-hat undefined: the loss traces are constant",
            "check that the sampler moves (step_size > 0, the component is not empty)",
            {"per_variable": values},
        )
    worst = max(finite)
    what = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
    details = {"per_variable": values, "warn": rhat_warn, "fail": rhat_fail}
    if worst > rhat_warn:
        status: Status = "fail" if worst > rhat_fail else "warn"
        return Verdict(
            "rhat",
            status,
            worst,
            f"chains level off at different values: R-hat {what} (> {rhat_warn:g})",
            "chains disagree: run longer or raise γ",
            details,
        )
    return Verdict("rhat", "ok", worst, f"chains agree: R-hat {what}", _NONE, details)


def _check_autocorrelation(
    run: _Run, alive: np.ndarray, target_ess: float, min_ess: float
) -> Verdict | None:
    x = run.trace("phi")
    if x is None:
        return None
    x = x[_finite_chains(x, alive)]
    if x.shape[0] == 0:
        return _no_chains("autocorrelation", "phi")
    num_chains, num_draws = x.shape
    ess = float(convergence.ess_bulk(x))
    if not math.isfinite(ess) or ess <= 0:
        return Verdict(
            "autocorrelation",
            "warn",
            None,
            f"ESS of φ undefined ({num_draws} draws per chain)",
            "keep more draws (num_draws >= 100)",
        )
    steps_per_draw = int(run.config.get("steps_per_draw", 1))
    tau_draws = num_chains * num_draws / ess
    tau_steps = tau_draws * steps_per_draw
    rec_thin = max(1, math.ceil(tau_steps))
    draws_needed = math.ceil(target_ess * tau_draws / num_chains)
    details = {
        "ess_bulk": ess,
        "tau_draws": tau_draws,
        "tau_steps": tau_steps,
        "steps_per_draw": steps_per_draw,
        "recommended_steps_per_draw": rec_thin,
        "draws_per_chain_for_target_ess": draws_needed,
        "target_ess": target_ess,
        "min_ess": min_ess,
    }
    msg = (
        f"φ: ESS {ess:.0f} from {num_chains}×{num_draws} draws, τ ≈ {tau_draws:.2g} draws "
        f"= {tau_steps:.3g} steps"
    )
    thin_hint = (
        f"steps_per_draw={rec_thin} would make draws ~independent"
        if tau_draws > 1.5
        else "draws are already ~independent"
    )
    if ess >= target_ess:
        return Verdict("autocorrelation", "ok", ess, msg, f"{_NONE} ({thin_hint})", details)
    status: Status = "fail" if ess < min_ess else "warn"
    return Verdict(
        "autocorrelation",
        status,
        ess,
        f"{msg}, below the target ESS {target_ess:g}",
        f"run >= {draws_needed} draws per chain at steps_per_draw={steps_per_draw} ({thin_hint})",
        details,
    )


def _check_distance(
    run: _Run,
    alive: np.ndarray,
    dim: int | None,
    gamma: float | None,
    trend_z: float,
    trend_z_fail: float,
    factor_warn: float,
    factor_fail: float,
) -> Verdict | None:
    x = run.trace("distance")
    if x is None:
        return None
    x = x[_finite_chains(x, alive)]
    if x.shape[0] == 0:
        return _no_chains("distance", "distance")
    tr = _trend(x)
    rms = float(np.sqrt((x[:, run.num_draws // 2 :] ** 2).mean()))
    scale = math.sqrt(dim / gamma) if dim and gamma else None
    ratio = rms / scale if scale else None
    details = {"rms_last_half": rms, "scale": scale, "ratio": ratio, **(tr or {})}
    z = tr["z"] if tr else 0.0
    statuses: list[Status] = ["ok"]
    msgs, actions = [], []
    if tr and z > trend_z:
        statuses.append("fail" if z > trend_z_fail else "warn")
        msgs.append(
            f"‖v − v*‖ still growing (last vs third quarter {tr['change']:+.3g}, {z:+.1f} SE)"
        )
        actions.append("weights drifting away: raise γ")
    if ratio is not None and ratio > factor_warn:
        statuses.append("fail" if ratio > factor_fail else "warn")
        msgs.append(
            f"RMS ‖v − v*‖ = {rms:.3g} is {ratio:.1f}× the localization scale "
            f"sqrt(dim/γ) = {scale:.3g}"
        )
        actions.append("weights far from w*: raise γ (or lower step_size)")
    status = _worst(statuses)
    if status == "ok":
        parts = [f"RMS ‖v − v*‖ = {rms:.3g}"]
        if ratio is not None:
            parts.append(f"{ratio:.2f}× sqrt(dim/γ)")
        if tr:
            parts.append(f"trend {z:+.1f} SE")
        return Verdict(
            "distance",
            "ok",
            ratio if ratio is not None else rms,
            "distance from w* bounded: " + ", ".join(parts),
            _NONE,
            details,
        )
    return Verdict(
        "distance",
        status,
        ratio if ratio is not None else z,
        "; ".join(msgs),
        "; ".join(dict.fromkeys(actions)),
        details,
    )


def _acceptance_verdict(
    mean: float, low: float, high: float, source: str, details: dict[str, Any]
) -> Verdict:
    details = {**details, "low": low, "high": high, "source": source}
    msg = f"MALA acceptance of the Langevin move {mean:.3f} ({source}); healthy [{low:g}, {high:g}]"
    if not math.isfinite(mean) or mean < low:
        return Verdict(
            "mala_acceptance",
            "fail",
            mean,
            msg,
            "step too large for this curvature: lower step_size",
            details,
        )
    if mean > high:
        return Verdict(
            "mala_acceptance",
            "warn",
            mean,
            msg,
            "step smaller than needed: step_size can be raised for faster mixing",
            details,
        )
    return Verdict("mala_acceptance", "ok", mean, msg, _NONE, details)


# ------------------------------------------------------------------- MALA acceptance
def mala_acceptance(
    posterior: LocalPosterior,
    step_size: float,
    *,
    positions: Any = None,
    batch: Batch | None = None,
    num_chains: int = 4,
    num_moves: int = MALA_MOVES,
    num_burnin: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Metropolis–Hastings acceptance probability of SGLD moves, along a short trajectory.

    From ``positions`` (``(chains, dim)``; default: ``num_chains`` copies of w*) the
    chains make SGLD moves v' = v − (ε/2)∇U(v) + √ε ξ with U and ∇U on one fixed batch
    (``batch``; ``None``: the full training set). Every move is scored with the MH
    acceptance probability min(1, exp(log r)), r from
    :func:`bayes_susc.kernels.mala.metropolis_log_ratio` — the probability that MALA on
    that batch would accept the move — and then taken regardless (this is the SGLD
    trajectory, not a MALA chain). Each move costs one gradient evaluation, at the
    proposal, which is also the next start point. A non-finite proposal scores 0 and
    the chain stays where it was.

    The stiff directions, which decide the acceptance, equilibrate within a few moves
    (their relaxation time is ≈ 1/(ε·λ_max)), so a short run from w* suffices.

    Args:
        posterior: the local posterior.
        step_size: ε of the SGLD move.
        positions: start points (``(chains, dim)`` tensor or array); default w*.
        batch: the fixed batch for U and ∇U; ``None`` uses the full training set.
        num_chains: chains when ``positions`` is not given.
        num_moves: scored moves per chain.
        num_burnin: moves made before scoring starts.
        seed: noise seed (chain k's noise depends on (seed, k) only).

    Returns:
        acceptance probabilities, array ``(chains, num_moves)``.
    """
    from bayes_susc.sampling.driver import chain_seeds  # sampling imports much; keep it lazy

    if not isinstance(posterior, LocalPosterior):
        raise TypeError(f"posterior must be a LocalPosterior, got {type(posterior).__name__}")
    eps = check_positive("step_size", step_size)
    num_moves = check_int("num_moves", num_moves, minimum=1)
    num_burnin = check_int("num_burnin", num_burnin, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    if positions is None:
        num_chains = check_int("num_chains", num_chains, minimum=1)
        v = posterior.anchor_vector.unsqueeze(0).expand(num_chains, -1).clone()
    else:
        v = torch.as_tensor(positions, dtype=posterior.dtype, device=posterior.device)
        if v.dim() != 2 or v.shape[1] != posterior.dim:
            raise ValueError(
                f"positions must have shape (chains, {posterior.dim}), got {tuple(v.shape)}"
            )
        if not torch.isfinite(v).all():
            raise ValueError("positions must be finite")
        v = v.clone()
        num_chains = v.shape[0]
    if batch is None:
        grad_fn = posterior.full_potential_and_grad
    else:
        posterior.check_batch("batch", batch)

        def grad_fn(pos: torch.Tensor):
            return posterior.potential_and_grad(pos, batch)

    noise = NoiseSource(chain_seeds(seed, num_chains), posterior.device, posterior.dtype)
    # The mala kernel's own proposal and ratio; the move is then taken whatever the ratio
    # (an SGLD trajectory), unless the proposal is non-finite.
    kernel = MALA(eps)
    cur = kernel.init(v, grad_fn, noise)
    probs = []
    for t in range(num_burnin + num_moves):
        new, log_r = kernel.propose(cur, grad_fn, noise)
        finite = torch.isfinite(new.potential) & torch.isfinite(new.position).all(-1)
        finite &= torch.isfinite(new.grad).all(-1)
        prob = torch.where(finite, torch.exp(log_r.clamp(max=0.0)), torch.zeros_like(log_r))
        if t >= num_burnin:
            probs.append(prob)
        keep = finite.unsqueeze(-1)
        cur = MALAState(
            torch.where(keep, new.position, cur.position),
            torch.where(finite, new.potential, cur.potential),
            torch.where(keep, new.grad, cur.grad),
            torch.where(finite, new.loss, cur.loss),
        )
    return torch.stack(probs, dim=1).cpu().numpy()


def check_mala_acceptance(
    posterior: LocalPosterior,
    step_size: float,
    *,
    acceptance_range: tuple[float, float] = ACCEPTANCE_RANGE,
    positions: Any = None,
    batch: Batch | None = None,
    num_chains: int = 4,
    num_moves: int = MALA_MOVES,
    num_burnin: int = 0,
    seed: int = 0,
) -> Verdict:
    """:func:`mala_acceptance` judged against ``acceptance_range`` (default [0.5, 0.99]).

    Below the range fails ("step too large for this curvature: lower step_size"), above
    it warns (the step could be raised).

    Args:
        posterior: the local posterior.
        step_size: ε of the SGLD move (the Langevin step).
        acceptance_range: healthy acceptance probability (low, high), 0 <= low < high <= 1.
        positions: start points (``(chains, dim)``); default ``num_chains`` copies of w*.
        batch: the fixed batch for U and ∇U; ``None`` uses the full training set.
        num_chains: chains when ``positions`` is not given.
        num_moves: scored moves per chain.
        num_burnin: moves made before scoring starts.
        seed: noise seed (chain k's noise depends on (seed, k) only).

    Returns:
        the ``mala_acceptance`` :class:`Verdict`; its value is the mean acceptance
        probability, its details the per-chain means and their standard error.
    """
    low, high = _check_range(acceptance_range)
    probs = mala_acceptance(
        posterior,
        step_size,
        positions=positions,
        batch=batch,
        num_chains=num_chains,
        num_moves=num_moves,
        num_burnin=num_burnin,
        seed=seed,
    )
    per_chain = probs.mean(axis=1)
    details = {
        "step_size": float(step_size),
        "per_chain": per_chain.tolist(),
        "num_moves": probs.shape[1],
        "se": float(per_chain.std(ddof=1) / math.sqrt(len(per_chain)))
        if len(per_chain) > 1
        else None,
    }
    return _acceptance_verdict(float(probs.mean()), low, high, "SGLD moves scored", details)


# ------------------------------------------------------------------------ entry points
def check_health(
    data: Any,
    *,
    posterior: LocalPosterior | None = None,
    thresholds: HealthThresholds = HealthThresholds(),
    mala: MalaCheck = MalaCheck(),
    seed: int = 0,
) -> HealthReport:
    """Health checks of one component's sampling run (see the module docstring).

    Args:
        data: a result of :func:`bayes_susc.sample` (InferenceData or DataTree).
        posterior: the run's :class:`LocalPosterior`; enables the ``mala_acceptance``
            check for SGLD runs (a ``"mala"`` run's recorded acceptance needs none), and
            gives dim and γ to the ``distance`` check when the run does not record them.
        thresholds: every check's thresholds (defaults in the module docstring).
        mala: how the ``mala_acceptance`` run is made (ε, batch, moves, chains); used
            only with ``posterior``.
        seed: noise seed of the ``mala_acceptance`` run (the only randomness here).

    Returns:
        :class:`HealthReport`; ``report.ok`` is False when any check failed.
    """
    if not isinstance(thresholds, HealthThresholds):
        raise TypeError(f"thresholds must be a HealthThresholds, got {type(thresholds).__name__}")
    if not isinstance(mala, MalaCheck):
        raise TypeError(f"mala must be a MalaCheck, got {type(mala).__name__}")
    seed = check_int("seed", seed, minimum=0)
    if posterior is not None and not isinstance(posterior, LocalPosterior):
        raise TypeError(f"posterior must be a LocalPosterior, got {type(posterior).__name__}")
    t = thresholds
    low, high = t.acceptance_range

    run = _read(data)
    alive = ~run.diverged
    dim = run.config.get("dim", posterior.dim if posterior is not None else None)
    gamma = run.config.get("gamma", posterior.gamma if posterior is not None else None)
    hyper = run.config.get("kernel_hyperparameters", {})

    verdicts: list[Verdict] = [_check_divergences(run), _check_stuck(run, alive)]
    verdicts += _check_loss(run, alive, t)
    verdicts.append(_check_spikes(run, alive, t.spike_z, t.spike_vars))
    for v in (
        _check_rhat(run, alive, t.rhat_warn, t.rhat_fail),
        _check_autocorrelation(run, alive, t.target_ess, t.min_ess),
        _check_distance(
            run,
            alive,
            dim,
            gamma,
            t.trend_z,
            t.trend_z_fail,
            t.distance_factor,
            t.distance_factor_fail,
        ),
    ):
        if v is not None:
            verdicts.append(v)

    accept = run.trace("acceptance_rate")
    if run.kernel == "mala" and accept is not None and alive.any():
        a = accept[alive]
        verdicts.append(
            _acceptance_verdict(
                float(np.nanmean(a)),
                low,
                high,
                "recorded by the MALA run",
                {"per_chain": np.nanmean(a, axis=1).tolist()},
            )
        )
    elif posterior is not None:
        step = mala.step_size if mala.step_size is not None else hyper.get("step_size")
        if step is None:
            verdicts.append(
                Verdict(
                    "mala_acceptance",
                    "warn",
                    None,
                    "the run records no step_size to score",
                    "pass mala=MalaCheck(step_size=...)",
                )
            )
        elif run.kernel not in (None, "sgld") and mala.step_size is None:
            verdicts.append(
                Verdict(
                    "mala_acceptance",
                    "ok",
                    None,
                    f"not scored: kernel {run.kernel!r} does not make the plain Langevin move",
                    f"{_NONE} (pass mala=MalaCheck(step_size=...) to score an SGLD move "
                    "of that size)",
                )
            )
        else:
            batch = None if mala.batch == "full" else posterior.train_batches[0]
            verdicts.append(
                check_mala_acceptance(
                    posterior,
                    float(step),
                    acceptance_range=(low, high),
                    batch=batch,
                    num_chains=mala.chains if mala.chains is not None else run.num_chains,
                    num_moves=mala.moves,
                    seed=seed,
                )
            )

    info = {
        "kernel": run.kernel,
        "chains": run.num_chains,
        "draws": run.num_draws,
        "steps_per_draw": run.config.get("steps_per_draw"),
        "num_burnin": run.config.get("num_burnin"),
        "nbeta": run.config.get("nbeta"),
        "gamma": gamma,
        "dim": dim,
        "kernel_hyperparameters": hyper,
    }
    return HealthReport(run.component, tuple(verdicts), info)


def check_run_health(
    runs: Mapping[str, Any],
    *,
    posteriors: Mapping[str, LocalPosterior] | None = None,
    thresholds: HealthThresholds = HealthThresholds(),
    mala: MalaCheck = MalaCheck(),
    seed: int = 0,
) -> RunHealth:
    """:func:`check_health` on every component of a run, with the same settings for all.

    Args:
        runs: component name → its sampling result.
        posteriors: component name → its :class:`LocalPosterior` (optional, enables
            the ``mala_acceptance`` check for those components).
        thresholds: every check's thresholds.
        mala: how the ``mala_acceptance`` runs are made.
        seed: noise seed of the ``mala_acceptance`` runs.

    Returns:
        :class:`RunHealth`: ``.reports`` per component, ``.table()``, ``.summary()``.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty mapping of component name -> sampling result")
    posteriors = posteriors or {}
    unknown = sorted(set(posteriors) - set(runs))
    if unknown:
        raise ValueError(f"posteriors names components not in runs: {unknown}")
    reports = {}
    for name, data in runs.items():
        report = check_health(
            data, posterior=posteriors.get(name), thresholds=thresholds, mala=mala, seed=seed
        )
        reports[str(name)] = HealthReport(str(name), report.verdicts, report.info)
    return RunHealth(reports)

"""Hyperparameter calibration: sweep (ε, nβ, γ) on short chains and recommend one setting.

:func:`calibrate` runs, for every component and every setting of the grid
``step_sizes × nbetas × gammas``, a short sampling run (:func:`bayes_susc.sample`), judges
it with the trace health checks (:func:`bayes_susc.checks.health.check_health`) and scores its
efficiency as **ESS per gradient evaluation**:

    ESS_bulk(φ) / (num_chains · (num_burnin + num_draws · steps_per_draw))

(every kernel step costs one minibatch gradient per chain; burn-in steps are paid for, so
they count; the ESS uses the surviving chains only, while the cost counts every chain).
ESS_bulk of ``eval_loss`` equals that of φ exactly (φ = eval_loss − L_E(w*), and the
rank-normalized ESS is shift invariant), so the table also reports the ESS of the other
half of χ's product series, ΔL_i = ℓ_i − L_E (median and minimum over probe items).

**Recommendation rule** (one setting for all components):

1. *Eligible* settings are those with no ``"fail"`` verdict on any component.
2. Among them, keep those with the fewest ``"warn"`` verdicts summed over components.
3. Among those, the best score is the largest *minimum over components* of ESS per
   gradient evaluation (the slowest component decides how long the production run
   must be).
4. Near-ties: every kept setting whose score is within 10 % of the best
   (``NEAR_TIE = 0.10``) counts as tied, and the tie is broken toward the **smaller step
   size**, then toward the literature (nβ, γ) = (30, 300) (closest in log distance),
   then the higher score. Why smaller ε: a 10 % difference in ESS is inside the noise of
   an ESS estimated from a short calibration run (a few hundred draws), so it is no
   real efficiency difference, whereas SGLD's step-size bias is systematic (on a
   quadratic potential its stationary covariance is (K − εK²/4)⁻¹, not K⁻¹: the variance
   is inflated by about ε·λ/4 in each direction), so a smaller ε is a free reduction
   in bias. nβ and γ change the *target* (what χ means), not just the sampler, so among
   equal step sizes the published values are kept for comparability.
5. If no setting is eligible, the result says so (``passed = False``) and recommends the
   least bad one: fewest components failing, then one without a ``step_size_bias``
   failure (a longer run cures short-run ESS or trend failures, never bias), then fewest
   failing verdicts, then fewest warnings, then the highest score; its summary lists the
   actions the failing verdicts suggest.

Note what the rule does not see: the health checks judge a *short* run. With the
default thresholds (``min_ess`` = 100) a setting whose φ has an autocorrelation time
above ``num_chains·num_draws/100`` draws fails the ``autocorrelation`` check; that is a
slow-mixing setting, which the score would rank low anyway. Pass
``health=HealthThresholds(...)`` to change thresholds.

Nor does the score see step-size *bias*: maximizing ESS per gradient favours large
ε·λ. For SGLD every row reports ``step_bias`` = ελ/(4 − ελ), the excess stationary
variance along the stiffest direction of U (λ by power iteration on the Hessian at w*,
:func:`bayes_susc.checks.step_size_bias.stiffest_curvature`; exact for a quadratic potential),
and ``max_step_bias=`` turns it into a failing check. Without it, on the 6-weight
linear–Gaussian test problem the rule picks ε = 1e-3, γ = 1000 (step_bias 38 %), whose
chain χ is off the posterior χ by up to 38 % of the largest |χ|; with
``max_step_bias=0.1`` it recommends ε = 3e-4, γ = 1000 (9 %) and reports that the short
runs need to be longer.

**Settings.** The grid is a frozen :class:`CalibrationGrid`, the health thresholds a
:class:`~bayes_susc.checks.health.HealthThresholds`, the MALA acceptance run a
:class:`~bayes_susc.checks.health.MalaCheck` (or None to skip it); each validates itself
when made. The kernel is a registered name plus ``kernel_hyperparameters`` (all but
``step_size``, which the grid sweeps), built once per grid ε before anything is sampled.

**Config files** (``bayes-susc calibrate CONFIG``, :func:`calibrate_from_config`)::

    factory = "package.module:function"   # returns model, loss_fn, train_data, ...
    out = "runs/calibration"
    [factory_kwargs]                       # passed to the factory
    [calibrate]
    step_sizes = [3e-4, 1e-3, 3e-3]        # -> grid=CalibrationGrid(...), with nbetas, gammas
    nbetas = [30.0]
    gammas = [300.0, 1000.0]
    kernel = "sghmc"                       # default "sgld"
    friction = 10.0                        # the kernel's own: -> kernel_hyperparameters
    num_draws = 100                        # num_chains, num_burnin, steps_per_draw, seed too
    max_step_bias = 0.1
    mala_check = true                      # false -> mala=None (no acceptance check)
    [calibrate.health]                     # -> health=HealthThresholds(...)
    min_ess = 50.0
    [calibrate.mala]                       # -> mala=MalaCheck(...): batch, moves, chains
    moves = 50

``[calibrate.health_kwargs]``, the table's first name, is still read as
``[calibrate.health]``, with a ``FutureWarning``; its former keys ``mala_moves`` and
``mala_chains`` are ``moves`` and ``chains`` of ``[calibrate.mala]`` now. Every error
names its key (``[calibrate.health.min_ess] must be <= target_ess, ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import itertools
import json
import math
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bayes_susc.checks.health import HealthReport, HealthThresholds, MalaCheck, check_health
from bayes_susc.checks.step_size_bias import sgld_variance_inflation, stiffest_curvature
from bayes_susc.errors import ConfigError, DivergenceWarning
from bayes_susc.estimation import convergence
from bayes_susc.kernels.base import (
    Kernel,
    available_kernels,
    kernel_hyperparameter_names,
    make_kernel,
)
from bayes_susc.sampling.driver import sample
from bayes_susc.storage.draws import get_group, to_jsonable
from bayes_susc.target.components import Component, ResolvedComponent
from bayes_susc.target.posterior import LocalPosterior, LossFn
from bayes_susc.validation import check_int, check_nonnegative, check_positive

__all__ = [
    "CalibrationConfigError",
    "CalibrationGrid",
    "CalibrationResult",
    "LITERATURE_DEFAULTS",
    "NEAR_TIE",
    "Setting",
    "calibrate",
    "calibrate_from_config",
]

#: The published hyperparameters (DESIGN.md §1); tie-breaks lean toward (nβ, γ) here.
LITERATURE_DEFAULTS = {"step_size": 1e-3, "nbeta": 30.0, "gamma": 300.0}
#: Scores within this fraction of the best count as tied.
NEAR_TIE = 0.10
DEFAULT_STEP_SIZES = (1e-4, 3e-4, 1e-3, 3e-3)
DEFAULT_NBETAS = (30.0,)
DEFAULT_GAMMAS = (300.0, 1000.0)
# The smallest value of each count calibrate() takes (one table, so a config is held to
# the same bounds before its factory runs).
_COUNT_MINIMUMS = {
    "num_chains": 2,
    "num_draws": 16,
    "num_burnin": 0,
    "steps_per_draw": 1,
    "seed": 0,
}
_RANK = {"ok": 0, "warn": 1, "fail": 2}
# Order in which problems are named in summaries: the most telling first (an unstable
# step shows in every check, and "run longer" would be the wrong advice for it).
_PRIORITY = (
    "divergences",
    "mala_acceptance",
    "distance",
    "spikes",
    "loss_anchor",
    "loss_trend",
    "rhat",
    "autocorrelation",
)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True, order=True)
class Setting:
    """One point of the grid.

    Attributes:
        step_size: ε, in the kernel's step-size units (SGLD: the Langevin step).
        nbeta: nβ, inverse temperature times the training-set size (dimensionless).
        gamma: γ, localization strength (nats per squared weight unit).
    """

    step_size: float
    nbeta: float
    gamma: float

    @property
    def label(self) -> str:
        """``ε=…, nβ=…, γ=…``: the setting in one short line."""
        return f"ε={self.step_size:g}, nβ={self.nbeta:g}, γ={self.gamma:g}"

    def to_dict(self) -> dict[str, float]:
        """``{"step_size": ε, "nbeta": nβ, "gamma": γ}``."""
        return {"step_size": self.step_size, "nbeta": self.nbeta, "gamma": self.gamma}


@dataclass(frozen=True)
class CalibrationGrid:
    """The (ε, nβ, γ) grid :func:`calibrate` sweeps: every combination is one setting.

    Each field is a sequence of numbers (one number counts as a one-value grid), stored
    as a tuple sorted ascending. Empty grids, repeated values, non-finite values and
    values out of range raise ``ValueError`` (``TypeError`` for a non-number) naming the
    field, e.g. ``step_sizes[1] must be > 0``.

    Attributes:
        step_sizes: ε values, in the kernel's step-size units (SGLD: the Langevin step
            of DESIGN.md §2), each > 0.
        nbetas: nβ values (inverse temperature times the training-set size,
            dimensionless), each > 0.
        gammas: γ values (localization strength, nats per squared weight unit), each >= 0.
    """

    step_sizes: tuple[float, ...] = DEFAULT_STEP_SIZES
    nbetas: tuple[float, ...] = DEFAULT_NBETAS
    gammas: tuple[float, ...] = DEFAULT_GAMMAS

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_sizes", _grid("step_sizes", self.step_sizes))
        object.__setattr__(self, "nbetas", _grid("nbetas", self.nbetas))
        object.__setattr__(self, "gammas", _grid("gammas", self.gammas, allow_zero=True))

    def settings(self) -> list[Setting]:
        """Every point of the grid, ε slowest-varying, then nβ, then γ."""
        return [
            Setting(e, n, g)
            for e, n, g in itertools.product(self.step_sizes, self.nbetas, self.gammas)
        ]


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """Scores of every (component, setting), the recommended setting and why.

    Attributes:
        table: ``pandas.DataFrame`` indexed by (component, step_size, nbeta, gamma):
            ``status``, ``n_fail``, ``n_warn``, ``failed_checks``, ``warned_checks``,
            ``num_diverged_chains``, ``unstable`` (a chain went non-finite, or the
            ``distance`` check failed: the chains ran away from w*), ``ess_phi``,
            ``ess_delta_loss_median``,
            ``ess_delta_loss_min``, ``ess_per_grad``, ``grad_evals``, ``mean_phi``,
            ``mcse_phi``, ``loss_trend_z``, ``loss_leveled_off`` (the ``loss_trend``
            check is ok), ``rhat``, ``mala_acceptance``, ``seconds``.
        settings: ``pandas.DataFrame`` indexed by (step_size, nbeta, gamma): ``status``
            (worst over components), ``n_failing_components``, ``n_fail``, ``n_warn``,
            ``min_ess_per_grad``, ``eligible``, ``recommended``.
        recommended: the recommended :class:`Setting`.
        passed: whether the recommended setting has no failing verdict on any component.
        reasons: sentences explaining the choice (the last is the recommendation).
        reports: (component, :class:`Setting`) → :class:`HealthReport`.
        traces: (component, :class:`Setting`) → ``eval_loss`` draws, ``(chain, draw)``
            (NaN after a chain diverged).
        anchors: component → L_E(w*).
        config: the sweep's arguments (grid, kernel, chains, draws, seed).
    """

    table: pd.DataFrame
    settings: pd.DataFrame
    recommended: Setting
    passed: bool
    reasons: tuple[str, ...]
    reports: Mapping[tuple[str, Setting], HealthReport] = field(repr=False)
    traces: Mapping[tuple[str, Setting], np.ndarray] = field(repr=False)
    anchors: Mapping[str, float]
    config: Mapping[str, Any]

    @property
    def components(self) -> list[str]:
        """The components' names, in the order calibrated."""
        return list(dict.fromkeys(c for c, _ in self.reports))

    @property
    def grid(self) -> list[Setting]:
        """Every setting swept, in grid order (ε, then nβ, then γ)."""
        return list(dict.fromkeys(s for _, s in self.reports))

    def summary(self) -> str:
        """Plain-text table of every setting, then the recommendation and its reasons."""
        s = self.settings
        cols = ["status", "n_fail", "n_warn", "min_ess_per_grad", "eligible"]
        lines = [
            f"calibration of {len(self.components)} component(s) "
            f"({', '.join(self.components)}), kernel {self.config['kernel']!r}, "
            f"{self.config['num_chains']} chains × {self.config['num_draws']} draws "
            f"(+{self.config['num_burnin']} burn-in, {self.config['steps_per_draw']} "
            "step(s)/draw)",
            "",
            f"{'step_size':>9} {'nbeta':>7} {'gamma':>8}  {'status':<6} {'fail':>4} "
            f"{'warn':>4} {'ESS/grad':>9}  first problem",
        ]
        for (eps, nb, ga), row in s[cols].iterrows():
            setting = Setting(eps, nb, ga)
            mark = "  <- recommended" if setting == self.recommended else ""
            lines.append(
                f"{eps:>9.3g} {nb:>7.4g} {ga:>8.4g}  {row['status']:<6} {row['n_fail']:>4d} "
                f"{row['n_warn']:>4d} {row['min_ess_per_grad']:>9.4f}  "
                f"{self._first_problem(setting)}{mark}"
            )
        lines += ["", "recommendation:"] + [f"  - {r}" for r in self.reasons]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.summary()

    def _first_problem(self, setting: Setting) -> str:
        problems = [
            (comp, v)
            for comp in self.components
            for v in self.reports[(comp, setting)].verdicts
            if v.status != "ok"
        ]
        if not problems:
            return "-"
        comp, v = min(problems, key=lambda cv: (-_RANK[cv[1].status], _priority(cv[1].name)))
        prefix = f"{comp}: " if len(self.components) > 1 else ""
        return f"{prefix}{v.name} {v.status} → {v.action}"

    def plot_traces(self, component: str | None = None, *, panel_size=(2.6, 1.8)) -> Any:
        """Grid of small panels of the ``eval_loss`` traces, one line per chain.

        Rows are step sizes, columns (nβ, γ) pairs. The dashed line is L_E(w*). A setting
        that fails on this component has a red title and frame, one that warns an
        orange title; the recommended setting has a green frame. Diverged chains end
        where they diverged (their later draws are NaN).

        Args:
            component: whose traces (default: the first component).
            panel_size (tuple[float, float]): (width, height) of one panel in inches.

        Returns:
            ``matplotlib.figure.Figure`` with one axes per setting.
        """
        import matplotlib.pyplot as plt

        comps = self.components
        component = comps[0] if component is None else component
        if component not in comps:
            raise ValueError(f"component must be one of {comps}, got {component!r}")
        steps = list(self.config["step_sizes"])
        pairs = [(nb, ga) for nb in self.config["nbetas"] for ga in self.config["gammas"]]
        fig, axes = plt.subplots(
            len(steps),
            len(pairs),
            figsize=(panel_size[0] * len(pairs), panel_size[1] * len(steps)),
            squeeze=False,
            layout="constrained",
        )
        anchor = self.anchors[component]
        for i, eps in enumerate(steps):
            for j, (nb, ga) in enumerate(pairs):
                ax = axes[i, j]
                setting = Setting(eps, nb, ga)
                trace = self.traces[(component, setting)]
                for k in range(trace.shape[0]):
                    ax.plot(trace[k], lw=0.7, alpha=0.85)
                ax.axhline(anchor, color="0.3", ls="--", lw=0.8)
                status = self.reports[(component, setting)].status
                color = {"ok": "black", "warn": "tab:orange", "fail": "tab:red"}[status]
                title = f"ε={eps:g} nβ={nb:g} γ={ga:g}"
                if status != "ok":
                    title += f" [{status.upper()}]"
                if setting == self.recommended:
                    title += " ★"
                ax.set_title(title, fontsize=7, color=color)
                ax.tick_params(labelsize=6)
                frame = "tab:green" if setting == self.recommended else None
                if status == "fail":
                    frame = "tab:red"
                if frame is not None:
                    for spine in ax.spines.values():
                        spine.set_edgecolor(frame)
                        spine.set_linewidth(2.0)
                if i == len(steps) - 1:
                    ax.set_xlabel("draw", fontsize=7)
                if j == 0:
                    ax.set_ylabel("eval loss", fontsize=7)
        fig.suptitle(f"{component}: eval-loss traces per chain (dashed: L_E(w*))", fontsize=9)
        return fig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: config, recommendation, reasons, both tables, every report."""
        table = self.table.reset_index().to_dict(orient="records")
        settings = self.settings.reset_index().to_dict(orient="records")
        reports: dict[str, dict[str, Any]] = {}
        for (comp, setting), report in self.reports.items():
            reports.setdefault(comp, {})[setting.label] = report.to_dict()
        return to_jsonable(
            {
                "config": dict(self.config),
                "recommended": self.recommended.to_dict(),
                "passed": self.passed,
                "reasons": list(self.reasons),
                "settings": settings,
                "table": table,
                "anchors": dict(self.anchors),
                "reports": reports,
            }
        )

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write ``calibration.json``, ``calibration.csv``, ``summary.txt`` and one
        ``traces_<component>.png`` per component into folder ``out``; returns the paths."""
        import matplotlib.pyplot as plt

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / "calibration.json",
            "csv": out / "calibration.csv",
            "summary": out / "summary.txt",
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2))
        self.table.to_csv(paths["csv"])
        paths["summary"].write_text(self.summary())
        for comp in self.components:
            fig = self.plot_traces(comp)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in comp)
            paths[f"traces_{comp}"] = out / f"traces_{safe}.png"
            fig.savefig(paths[f"traces_{comp}"], dpi=120)
            plt.close(fig)
        return paths


def _priority(name: str) -> int:
    return _PRIORITY.index(name) if name in _PRIORITY else len(_PRIORITY)


# -------------------------------------------------------------------------- validation
def _grid(name: str, values: Any, *, allow_zero: bool = False) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} must hold at least one value, got an empty grid")
    check = check_nonnegative if allow_zero else check_positive
    out = tuple(check(f"{name}[{i}]", v) for i, v in enumerate(values))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} holds repeated values: {list(out)}")
    return tuple(sorted(out))


def _check_run(
    *,
    num_chains: int,
    num_draws: int,
    num_burnin: int,
    steps_per_draw: int,
    seed: int,
    max_step_bias: float | None,
) -> dict[str, Any]:
    """The short runs' counts and the bias bound, checked (calibrate() and the config
    loader both call this, so their bounds cannot differ); returns them normalised."""
    out: dict[str, Any] = {
        key: check_int(key, value, minimum=_COUNT_MINIMUMS[key])
        for key, value in (
            ("num_chains", num_chains),
            ("num_draws", num_draws),
            ("num_burnin", num_burnin),
            ("steps_per_draw", steps_per_draw),
            ("seed", seed),
        )
    }
    out["max_step_bias"] = (
        None if max_step_bias is None else check_positive("max_step_bias", max_step_bias)
    )
    return out


def _kernels(
    kernel: str, hyperparameters: Mapping[str, Any], step_sizes: Sequence[float]
) -> dict[float, Kernel]:
    """One kernel per grid step size, built from the name and hyperparameters (the one
    place calibrate() builds them; an error names what the kernel refuses)."""
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a registered kernel name, got {kernel!r}")
    if not isinstance(hyperparameters, Mapping):
        raise TypeError(
            f"kernel_hyperparameters must be a mapping name -> value, got {hyperparameters!r}"
        )
    names = kernel_hyperparameter_names(kernel)  # ValueError for an unregistered name
    hyper = dict(hyperparameters)
    if "step_size" in hyper:
        raise ValueError(
            "kernel_hyperparameters may not hold 'step_size': the grid's step_sizes are swept"
        )
    own = [n for n in names if n != "step_size"]
    unknown = sorted(set(hyper) - set(own))
    if unknown:
        raise ValueError(
            f"kernel_hyperparameters {unknown} are not hyperparameters of kernel {kernel!r}; "
            f"it takes {own} besides step_size"
        )
    try:
        return {eps: make_kernel(kernel, step_size=eps, **hyper) for eps in step_sizes}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"kernel {kernel!r} rejects {hyper}: {exc}") from None


def _components(
    components: Any, model: torch.nn.Module
) -> list[tuple[str, Component | ResolvedComponent]]:
    """Normalise ``components`` to a list of (name, component)."""
    if components is None:
        raise ValueError("components must be given: a Component or a list of Components")
    if isinstance(components, (Component, ResolvedComponent)):
        components = [components]
    if isinstance(components, Mapping):
        items = []
        for name, comp in components.items():
            if isinstance(comp, (Component, ResolvedComponent)):
                items.append(comp)
            elif isinstance(comp, Iterable) and not isinstance(comp, str):
                items.append(Component.from_parameters(str(name), list(comp)))
            else:
                raise TypeError(
                    f"components[{name!r}] must be a Component or a list of parameter names, "
                    f"got {comp!r}"
                )
        components = items
    if isinstance(components, str) or not isinstance(components, Iterable):
        raise TypeError(
            f"components must be a Component, a list of Components or a mapping "
            f"name -> parameter names, got {components!r}"
        )
    components = list(components)
    if not components:
        raise ValueError("components is empty: give at least one component")
    out = []
    for i, comp in enumerate(components):
        if not isinstance(comp, (Component, ResolvedComponent)):
            raise TypeError(
                f"components[{i}] must be a Component (use Component.from_parameters for a "
                f"list of parameter names, or pass a mapping name -> names), got {comp!r}"
            )
        out.append((str(comp.name), comp))
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"components must have distinct names; repeated: {dupes}")
    return out


# ------------------------------------------------------------------------------ scores
def _scores(data: Any, report: HealthReport, grad_evals: int) -> dict[str, Any]:
    post = get_group(data, "posterior")
    stats = get_group(data, "sample_stats")
    phi = np.asarray(post["phi"].values, dtype=float)
    diverged = np.asarray(stats["diverged"].values, dtype=bool).any(axis=-1)
    alive = ~diverged & np.isfinite(phi).all(axis=1)
    row: dict[str, Any] = {"num_diverged_chains": int(diverged.sum())}
    if alive.any():
        p = phi[alive]
        dl = (
            np.asarray(post["probe_loss"].values, dtype=float)[alive]
            - np.asarray(post["eval_loss"].values, dtype=float)[alive][..., None]
        )
        with np.errstate(all="ignore"):
            ess_phi = float(convergence.ess_bulk(p))
            ess_dl = np.asarray(convergence.ess_bulk(dl), dtype=float)
            mcse = float(convergence.mcse_mean(p))
        ess_phi = ess_phi if math.isfinite(ess_phi) else 0.0
        row.update(
            ess_phi=ess_phi,
            ess_delta_loss_median=float(np.nanmedian(ess_dl)) if np.isfinite(ess_dl).any() else 0.0,
            ess_delta_loss_min=float(np.nanmin(ess_dl)) if np.isfinite(ess_dl).any() else 0.0,
            mean_phi=float(p.mean()),
            mcse_phi=mcse,
        )
    else:
        row.update(
            ess_phi=0.0,
            ess_delta_loss_median=0.0,
            ess_delta_loss_min=0.0,
            mean_phi=math.nan,
            mcse_phi=math.nan,
        )
    row["grad_evals"] = grad_evals
    row["ess_per_grad"] = row["ess_phi"] / grad_evals
    fails = [v.name for v in report.verdicts if v.status == "fail"]
    warns = [v.name for v in report.verdicts if v.status == "warn"]
    row.update(
        status=report.status,
        n_fail=len(fails),
        n_warn=len(warns),
        failed_checks=",".join(fails),
        warned_checks=",".join(warns),
    )
    distance = report["distance"] if "distance" in report else None
    row["unstable"] = row["num_diverged_chains"] > 0 or (
        distance is not None and distance.status == "fail"
    )
    trend = report["loss_trend"] if "loss_trend" in report else None
    row["loss_trend_z"] = math.nan if trend is None or trend.value is None else trend.value
    row["loss_leveled_off"] = None if trend is None else trend.status == "ok"
    for name, col in (("rhat", "rhat"), ("mala_acceptance", "mala_acceptance")):
        v = report[name] if name in report else None
        row[col] = math.nan if v is None or v.value is None else float(v.value)
    return row


def _settings_table(table: pd.DataFrame) -> pd.DataFrame:
    g = table.groupby(level=["step_size", "nbeta", "gamma"], sort=True)
    out = pd.DataFrame(
        {
            "status": g["status"].agg(lambda s: max(s, key=_RANK.__getitem__)),
            "n_failing_components": g["n_fail"].agg(lambda s: int((s > 0).sum())),
            "n_fail": g["n_fail"].sum().astype(int),
            "n_warn": g["n_warn"].sum().astype(int),
            "min_ess_per_grad": g["ess_per_grad"].min(),
            "max_step_bias": g["step_bias"].max(),
            "step_bias_fail": g["failed_checks"].agg(
                lambda s: any("step_size_bias" in c.split(",") for c in s)
            ),
        }
    )
    out["eligible"] = out["n_fail"] == 0
    return out


def _recommend(
    settings: pd.DataFrame, reports: Mapping[tuple[str, Setting], HealthReport]
) -> tuple[Setting, bool, list[str]]:
    """The rule of the module docstring; returns (setting, passed, reasons)."""
    lit = LITERATURE_DEFAULTS
    rows = [(Setting(*idx), row) for idx, row in settings.iterrows()]

    def lit_distance(s: Setting) -> float:
        return abs(math.log(s.nbeta / lit["nbeta"])) + abs(
            math.log(max(s.gamma, 1e-12) / lit["gamma"])
        )

    reasons: list[str] = []
    eligible = [(s, r) for s, r in rows if r["eligible"]]
    passed = bool(eligible)
    if passed:
        reasons.append(
            f"{len(eligible)} of {len(rows)} settings have no failing check on any component"
        )
        fewest = min(int(r["n_warn"]) for _, r in eligible)
        kept = [(s, r) for s, r in eligible if int(r["n_warn"]) == fewest]
        reasons.append(
            f"{len(kept)} of them have the fewest warnings ({fewest} summed over components)"
        )
        best = max(float(r["min_ess_per_grad"]) for _, r in kept)
        tied = [(s, r) for s, r in kept if float(r["min_ess_per_grad"]) >= (1 - NEAR_TIE) * best]
        tied.sort(key=lambda sr: (sr[0].step_size, lit_distance(sr[0]), -sr[1]["min_ess_per_grad"]))
        choice, row = tied[0]
        reasons.append(
            f"best minimum-over-components ESS per gradient evaluation {best:.4g}; "
            f"{len(tied)} setting(s) within {NEAR_TIE:.0%} of it"
            + (
                ", tie broken toward the smaller step size (less step-size bias), then the "
                f"literature (nβ, γ) = ({lit['nbeta']:g}, {lit['gamma']:g})"
                if len(tied) > 1
                else ""
            )
        )
        reasons.append(
            f"recommended: {choice.label} (ESS per gradient evaluation "
            f"{float(row['min_ess_per_grad']):.4g}, {int(row['n_warn'])} warning(s))"
        )
        return choice, True, reasons
    # A longer run cures a failing ESS or trend check; it never cures step-size bias, so
    # a biased setting ranks below an unbiased one with the same number of failures.
    rows.sort(
        key=lambda sr: (
            int(sr[1]["n_failing_components"]),
            bool(sr[1]["step_bias_fail"]),
            int(sr[1]["n_fail"]),
            int(sr[1]["n_warn"]),
            -float(sr[1]["min_ess_per_grad"]),
        )
    )
    choice, row = rows[0]
    reasons.append(f"no setting passed: every one of the {len(rows)} has a failing check")
    actions: list[str] = []
    if bool(row["step_bias_fail"]):
        actions.append("step_size_bias → lower step_size")
    for (comp, setting), report in reports.items():
        if setting == choice:
            for v in sorted(report.verdicts, key=lambda v: _priority(v.name)):
                if v.status == "fail":
                    actions.append(f"{comp}: {v.name} → {v.action}")
    reasons.append(
        f"least bad: {choice.label} ({int(row['n_failing_components'])} failing component(s), "
        f"{int(row['n_fail'])} failing check(s)); its failing checks suggest: "
        + "; ".join(dict.fromkeys(actions))
    )
    reasons.append(f"recommended (NOT passed, use with care or extend the grid): {choice.label}")
    return choice, False, reasons


# ---------------------------------------------------------------------------- calibrate
def calibrate(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train_data: Any,
    components: Any,
    *,
    eval_data: Any,
    probe_data: Any = None,
    grid: CalibrationGrid = CalibrationGrid(),
    kernel: str = "sgld",
    kernel_hyperparameters: Mapping[str, float] | None = None,
    num_chains: int = 4,
    num_draws: int = 100,
    num_burnin: int = 50,
    steps_per_draw: int = 1,
    seed: int = 0,
    # Frozen settings: one default instance shared by every call cannot change.
    health: HealthThresholds = HealthThresholds(),  # noqa: B008
    mala: MalaCheck | None = MalaCheck(),  # noqa: B008
    max_step_bias: float | None = None,
    progress: bool = False,
    callback: Callable[[str, Setting, dict[str, Any]], None] | None = None,
) -> CalibrationResult:
    """Sweep (ε, nβ, γ) on short chains, score each setting, recommend one.

    Args:
        model: the trained network, as for :class:`bayes_susc.LocalPosterior`; a fresh
            posterior is built for every (component, nβ, γ), anchored at the model's
            current weights.
        loss_fn: per-item loss, as for :class:`bayes_susc.LocalPosterior`.
        train_data: the training batches, as for :class:`bayes_susc.LocalPosterior`.
        components: a :class:`Component` (or resolved one), a list of them, or a mapping
            name → list of parameter names. One setting is recommended for all.
        eval_data: the evaluation set E (φ and ``eval_loss``).
        probe_data: probe items; default ``eval_data``.
        grid: the ε, nβ and γ values swept (:class:`CalibrationGrid`; default
            ε ∈ {1e-4, 3e-4, 1e-3, 3e-3}, nβ = 30, γ ∈ {300, 1000}).
        kernel: registered kernel name; each grid ε is its ``step_size``.
        kernel_hyperparameters: the kernel's other hyperparameters (e.g.
            ``{"friction": 10.0}`` for ``"sghmc"``, in the kernel's own units), the same
            for every setting; not ``step_size``. Default: the kernel's defaults.
        num_chains: chains of every short run (>= 2).
        num_draws: kept draws per chain of every short run (>= 16).
        num_burnin: burn-in steps of every short run.
        steps_per_draw: thinning of every short run, in kernel steps per kept draw.
        seed: seed of every short run and of its MALA acceptance run (the same for every
            setting: common random numbers across the grid).
        health: thresholds of the health checks (:class:`HealthThresholds`).
        mala: how the MALA acceptance of the SGLD move is scored (only for
            ``kernel="sgld"``; by default one extra gradient per chain per move, 100
            moves, on the first training batch); its ``step_size`` must be None, since
            each setting's ε is scored. None skips the check.
        max_step_bias: for ``kernel="sgld"``, the largest tolerated step-size bias
            ελ/(4 − ελ), the relative excess stationary variance along the stiffest
            direction of U (λ from :func:`bayes_susc.checks.step_size_bias.stiffest_curvature`
            on the first training batch). Settings above it fail a ``step_size_bias``
            check. Default None: the bias is reported (column ``step_bias``) but does not
            decide; 0.1 is a sensible bound where χ must match the posterior.
        progress: a progress bar per run.
        callback: ``callback(component, setting, row)`` after each run (e.g. logging).

    Returns:
        :class:`CalibrationResult`.

    Raises:
        ValueError: a count below its minimum, a kernel hyperparameter the kernel
            refuses, ``max_step_bias`` <= 0, no components or no ``eval_data``.
        TypeError: ``grid``, ``health`` or ``mala`` of the wrong class.
    """
    if not isinstance(grid, CalibrationGrid):
        raise TypeError(f"grid must be a CalibrationGrid, got {type(grid).__name__}")
    if not isinstance(health, HealthThresholds):
        raise TypeError(f"health must be a HealthThresholds, got {type(health).__name__}")
    if mala is not None and not isinstance(mala, MalaCheck):
        raise TypeError(f"mala must be a MalaCheck or None, got {type(mala).__name__}")
    if mala is not None and mala.step_size is not None:
        raise ValueError("mala.step_size must be None: calibrate scores each setting's ε")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    comps = _components(components, model)
    run = _check_run(
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin=num_burnin,
        steps_per_draw=steps_per_draw,
        seed=seed,
        max_step_bias=max_step_bias,
    )
    num_chains, num_draws, num_burnin = run["num_chains"], run["num_draws"], run["num_burnin"]
    steps_per_draw, seed, max_step_bias = run["steps_per_draw"], run["seed"], run["max_step_bias"]
    hyper = dict(kernel_hyperparameters or {})
    kernels = _kernels(kernel, hyper, grid.step_sizes)
    if eval_data is None:
        raise ValueError("eval_data must be given (a batch or a list of batches)")
    probe_data = eval_data if probe_data is None else probe_data
    step_sizes, nbetas, gammas = grid.step_sizes, grid.nbetas, grid.gammas
    mala_check = mala is not None and kernel == "sgld"

    settings_grid = grid.settings()
    grad_evals = num_chains * (num_burnin + num_draws * steps_per_draw)
    rows, reports, traces, anchors = {}, {}, {}, {}
    for (name, comp), nb, ga in itertools.product(comps, nbetas, gammas):
        posterior = LocalPosterior(model, loss_fn, train_data, comp, nbeta=nb, gamma=ga)
        # The bias proxy is SGLD's own (see sgld_variance_inflation).
        curvature = stiffest_curvature(posterior) if kernel == "sgld" else math.nan
        for eps in step_sizes:
            setting = Setting(eps, nb, ga)
            start = time.perf_counter()
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", DivergenceWarning)
                data = sample(
                    posterior,
                    kernels[eps],
                    eval_data=eval_data,
                    probe_data=probe_data,
                    num_chains=num_chains,
                    num_draws=num_draws,
                    num_burnin=num_burnin,
                    steps_per_draw=steps_per_draw,
                    seed=seed,
                    progress=progress,
                )
                report = check_health(
                    data,
                    posterior=posterior if mala_check else None,
                    thresholds=health,
                    mala=mala if mala is not None else MalaCheck(),
                    seed=seed,
                )
                row = _scores(data, report, grad_evals)
            row["curvature"] = curvature
            row["step_bias"] = (
                sgld_variance_inflation(eps, curvature) if math.isfinite(curvature) else math.nan
            )
            if max_step_bias is not None and row["step_bias"] > max_step_bias:
                row["n_fail"] += 1
                row["status"] = "fail"
                row["failed_checks"] = ",".join(
                    c for c in (row["failed_checks"], "step_size_bias") if c
                )
            row["seconds"] = time.perf_counter() - start
            report = HealthReport(name, report.verdicts, report.info)
            rows[(name, eps, nb, ga)] = row
            reports[(name, setting)] = report
            traces[(name, setting)] = np.asarray(
                get_group(data, "posterior")["eval_loss"].values, dtype=float
            )
            anchors[name] = float(get_group(data, "constant_data")["eval_loss_anchor"].values)
            if callback is not None:
                callback(name, setting, row)

    order = [(n, s.step_size, s.nbeta, s.gamma) for n, _ in comps for s in settings_grid]
    table = pd.DataFrame.from_dict({k: rows[k] for k in order}, orient="index")
    table.index = pd.MultiIndex.from_tuples(
        order, names=["component", "step_size", "nbeta", "gamma"]
    )
    first = ["status", "n_fail", "n_warn", "failed_checks", "warned_checks"]
    table = table[first + [c for c in table.columns if c not in first]]
    settings = _settings_table(table)
    ordered_reports = {(n, s): reports[(n, s)] for n, _ in comps for s in settings_grid}
    recommended, passed, reasons = _recommend(settings, ordered_reports)
    bias = settings.loc[(recommended.step_size, recommended.nbeta, recommended.gamma)][
        "max_step_bias"
    ]
    if math.isfinite(bias):
        reasons.insert(
            -1,
            f"its SGLD step-size bias: stationary variance {bias:.1%} too large along the "
            "stiffest direction"
            + ("" if max_step_bias is not None else " (pass max_step_bias= to bound it)"),
        )
    settings["recommended"] = [Setting(*idx) == recommended for idx in settings.index]
    config = {
        "components": [n for n, _ in comps],
        "step_sizes": list(step_sizes),
        "nbetas": list(nbetas),
        "gammas": list(gammas),
        "kernel": kernel,
        "kernel_hyperparameters": hyper,
        "num_chains": num_chains,
        "num_draws": num_draws,
        "num_burnin": num_burnin,
        "steps_per_draw": steps_per_draw,
        "grad_evals_per_run": grad_evals,
        "seed": seed,
        "mala_check": mala_check,
        "mala": dataclasses.asdict(mala) if mala_check and mala is not None else None,
        "max_step_bias": max_step_bias,
        "health": dataclasses.asdict(health),
        "near_tie": NEAR_TIE,
        "literature_defaults": dict(LITERATURE_DEFAULTS),
    }
    return CalibrationResult(
        table=table,
        settings=settings,
        recommended=recommended,
        passed=passed,
        reasons=tuple(reasons),
        reports=ordered_reports,
        traces=traces,
        anchors=anchors,
        config=config,
    )


# ------------------------------------------------------------------------ command line
class CalibrationConfigError(ConfigError):
    """A calibration config is invalid: unknown key, wrong type or value, a factory that
    cannot be imported or called as configured, or one that returns the wrong keys.

    A :class:`ValueError` (and a :class:`bayes_susc.errors.ConfigError`, so the
    ``bayes-susc`` command prints it without a traceback and exits with code 2). The
    message names the key (``[calibrate.num_draws]``, ``'factory'``) and what it expects.
    """


_TOP_LEVEL = "the config's top level"
_TOP_SPEC = {"factory": "factory", "factory_kwargs": "table", "out": "str", "calibrate": "table"}
# Each [calibrate] key: the kind of value it takes and the calibrate() parameter it becomes.
# The chosen kernel's own hyperparameters are [calibrate] keys too (they become
# kernel_hyperparameters). calibrate()'s other parameters come from the factory (the data),
# the command line (progress) or cannot be written in TOML (callback).
# tests/test_calibration.py keeps this in step with calibrate()'s signature and with the
# fields of CalibrationGrid, HealthThresholds and MalaCheck.
_CALIBRATE_SPEC: dict[str, tuple[str, str]] = {
    "step_sizes": ("list[number]", "grid"),
    "nbetas": ("list[number]", "grid"),
    "gammas": ("list[number]", "grid"),
    "kernel": ("str", "kernel"),
    "num_chains": ("int", "num_chains"),
    "num_draws": ("int", "num_draws"),
    "num_burnin": ("int", "num_burnin"),
    "steps_per_draw": ("int", "steps_per_draw"),
    "seed": ("int", "seed"),
    "max_step_bias": ("number|null", "max_step_bias"),
    "health": ("table", "health"),
    "health_kwargs": ("table", "health"),  # the old name of [calibrate.health]
    "mala_check": ("bool", "mala"),
    "mala": ("table", "mala"),
}
# [calibrate.mala]: MalaCheck's fields but step_size, which each setting's ε fills.
_MALA_SPEC = {"batch": "str", "moves": "int", "chains": "int|null"}
# Keys the old [calibrate.health_kwargs] took that belong elsewhere now.
_MOVED_HEALTH_KEYS = {
    "mala_moves": "'moves' in [calibrate.mala]",
    "mala_chains": "'chains' in [calibrate.mala]",
    "mala_step_size": "not settable: calibrate scores each setting's ε",
}
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "int|null": "an integer (or null)",
    "number": "a number",
    "number|null": "a number (or null)",
    "bool": "true or false",
    "table": "a table",
    "list[number]": "a list of numbers",
    "list[str]": "a list of strings",
    "factory": 'a string "package.module:function"',
    "any": "anything",
}
_FACTORY_KEYS = {"model", "loss_fn", "train_data", "eval_data", "probe_data", "components"}


def _type_ok(kind: str, value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    integer = isinstance(value, int) and not isinstance(value, bool)
    if kind in ("str", "factory"):
        return isinstance(value, str)
    if kind == "int":
        return integer
    if kind == "int|null":
        return integer or value is None
    if kind == "number":
        return number
    if kind == "number|null":
        return number or value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "table":
        return isinstance(value, Mapping)
    if kind == "list[number]":
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    if kind == "list[str]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return kind == "any"


def _check_keys(
    where: str, table: Any, spec: Mapping[str, str], moved: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``table`` is a table whose keys are all in ``spec`` and whose values have the kinds
    ``spec`` names; returns it as a dict. ``moved``: where keys that left it went."""
    if not isinstance(table, Mapping):
        raise CalibrationConfigError(
            f"{where} must be a table, got {table!r} ({type(table).__name__})"
        )
    allowed = sorted(spec)
    unknown = sorted(set(table) - set(spec))
    if unknown:
        moved = moved or {}
        hints = [f"{k!r} is now {moved[k]}" for k in unknown if k in moved]
        for k in unknown:
            match = difflib.get_close_matches(str(k), allowed, n=1)
            if match and k not in moved:
                hints.append(f"did you mean {match[0]!r} for {k!r}?")
        raise CalibrationConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"in {where}; allowed keys: {allowed}" + (f" ({'; '.join(hints)})" if hints else "")
        )
    for key, value in table.items():
        if not _type_ok(spec[key], value):
            raise CalibrationConfigError(
                f"{_key(where, key)} must be {_TYPE_WORDS[spec[key]]}, got {value!r} "
                f"({type(value).__name__})"
            )
    return dict(table)


def _key(where: str, key: str) -> str:
    return f"{where[:-1]}.{key}]" if where.startswith("[") else repr(key)


def _build(where: str, make: Callable[..., Any], values: Mapping[str, Any], names: Any) -> Any:
    """``make(**values)``, a ``TypeError`` or ``ValueError`` of it raised again as a
    :class:`CalibrationConfigError` naming the key: the settings classes and checks start
    their messages with the field's name (one of ``names``), which becomes the key."""
    try:
        return make(**values)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        for name in sorted(names, key=len, reverse=True):  # "trend_z_fail" before "trend_z"
            rest = msg[len(name) :]
            if msg.startswith(name) and not (rest[:1].isalnum() or rest[:1] == "_"):
                raise CalibrationConfigError(_key(where, name) + rest) from None
        raise CalibrationConfigError(f"{where} {msg}") from None


def _kernel_spec(name: str) -> dict[str, str]:
    """[calibrate] keys of kernel ``name``'s own hyperparameters (step_size is the grid's):
    a number where the kernel's default is one, else anything (the kernel checks it)."""
    try:
        defaults = make_kernel(name).hyperparameters()
    except Exception:  # a user's factory with required arguments: no defaults to read
        defaults = {}
    return {
        k: "number"
        if isinstance(defaults.get(k), (int, float)) and not isinstance(defaults.get(k), bool)
        else "any"
        for k in kernel_hyperparameter_names(name)
        if k != "step_size"
    }


def _health_spec() -> dict[str, str]:
    """[calibrate.health] keys: the fields of HealthThresholds, kinds from their defaults."""
    spec = {}
    for f in dataclasses.fields(HealthThresholds):
        if isinstance(f.default, tuple):
            strings = all(isinstance(v, str) for v in f.default)
            spec[f.name] = "list[str]" if strings else "list[number]"
        else:
            spec[f.name] = "number"
    return spec


def _check_calibrate(table: Any) -> dict[str, Any]:
    """The [calibrate] table, turned into :func:`calibrate`'s keyword arguments.

    Its keys and their types are checked here; the values by the very classes and checks
    :func:`calibrate` uses (:class:`CalibrationGrid`, :class:`HealthThresholds`,
    :class:`MalaCheck`, the counts' and the kernel's checks), so that a bad value fails,
    named by its key, before the factory builds anything.
    """
    if not isinstance(table, Mapping):
        raise CalibrationConfigError(
            f"[calibrate] must be a table, got {table!r} ({type(table).__name__})"
        )
    # The kernel first: which other keys are allowed depends on it.
    kernel = table.get("kernel", "sgld")
    if not isinstance(kernel, str) or kernel not in available_kernels():
        raise CalibrationConfigError(
            f"[calibrate.kernel] must be a registered kernel {available_kernels()}, got {kernel!r}"
        )
    spec = {**_kernel_spec(kernel), **{k: kind for k, (kind, _) in _CALIBRATE_SPEC.items()}}
    cal = _check_keys("[calibrate]", table, spec)
    hyper = {k: v for k, v in cal.items() if k not in _CALIBRATE_SPEC}
    kwargs: dict[str, Any] = {"kernel": kernel, "kernel_hyperparameters": hyper}

    grid_fields = [f.name for f in dataclasses.fields(CalibrationGrid)]
    grid = _build(
        "[calibrate]", CalibrationGrid, {k: cal[k] for k in grid_fields if k in cal}, grid_fields
    )
    kwargs["grid"] = grid
    run_keys = ["num_chains", "num_draws", "num_burnin", "steps_per_draw", "seed", "max_step_bias"]
    defaults = inspect.signature(calibrate).parameters
    run = _build(
        "[calibrate]",
        _check_run,
        {k: cal.get(k, defaults[k].default) for k in run_keys},
        run_keys,
    )
    kwargs.update({k: run[k] for k in run_keys if k in cal})
    try:
        _kernels(kernel, hyper, grid.step_sizes)
    except (TypeError, ValueError) as exc:
        raise CalibrationConfigError(f"[calibrate] {exc}") from None
    except Exception as exc:  # a user kernel's factory may raise anything on bad values
        raise CalibrationConfigError(
            f"[calibrate] kernel {kernel!r} rejects {hyper}: {exc}"
        ) from None

    health_key = "health"
    if "health_kwargs" in cal:
        if "health" in cal:
            raise CalibrationConfigError(
                "[calibrate] holds both 'health' and 'health_kwargs' (its old name): "
                "keep [calibrate.health] only"
            )
        warnings.warn(
            "[calibrate.health_kwargs] is the old name of [calibrate.health]; it is read "
            "as [calibrate.health] (rename it, the old name will go)",
            FutureWarning,
            stacklevel=4,
        )
        health_key = "health_kwargs"
    if health_key in cal:
        where = f"[calibrate.{health_key}]"
        values = _check_keys(where, cal[health_key], _health_spec(), _MOVED_HEALTH_KEYS)
        kwargs["health"] = _build(where, HealthThresholds, values, _health_spec())

    if "mala" in cal:
        values = _check_keys("[calibrate.mala]", cal["mala"], _MALA_SPEC)
        if cal.get("mala_check") is False:
            raise CalibrationConfigError(
                "[calibrate.mala] is given but [calibrate.mala_check] = false skips the check: "
                "drop one of them"
            )
        kwargs["mala"] = _build("[calibrate.mala]", MalaCheck, values, _MALA_SPEC)
    elif cal.get("mala_check") is False:
        kwargs["mala"] = None
    return kwargs


def _check_config(config: Any, where: str = "config") -> dict[str, Any]:
    """The whole config, before anything is imported or sampled: top-level keys and types,
    the factory's ``"package.module:function"`` form, and the [calibrate] table
    (:func:`_check_calibrate`, which turns it into :func:`calibrate`'s keywords)."""
    if not isinstance(config, Mapping):
        raise CalibrationConfigError(
            f"{where} must hold a table/object at the top level, got {type(config).__name__}"
        )
    cfg = _check_keys(_TOP_LEVEL, config, _TOP_SPEC)
    if "factory" not in cfg:
        raise CalibrationConfigError(
            f"{where} has no 'factory': give factory = \"package.module:function\", a "
            "function returning model, loss_fn, train_data, eval_data, components"
        )
    module_name, colon, attr = cfg["factory"].partition(":")
    if not colon or not module_name.strip() or not attr.strip():
        raise CalibrationConfigError(
            f"'factory' must be \"package.module:function\", got {cfg['factory']!r}"
        )
    cfg["calibrate"] = _check_calibrate(cfg.get("calibrate", {}))
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a calibration config (TOML, or JSON by the ``.json`` suffix) and check it; see
    the module docstring and :func:`calibrate_from_config` for its keys.

    Checked here, before any import or sampling: the file exists and parses; only known
    keys at the top level, in ``[calibrate]`` (:func:`calibrate`'s settings plus the
    chosen kernel's own hyperparameters), in ``[calibrate.health]`` (the fields of
    :class:`~bayes_susc.checks.health.HealthThresholds`; ``health_kwargs`` is read as
    its old name, with a ``FutureWarning``) and in ``[calibrate.mala]``; every value's
    type; the factory's ``"package.module:function"`` form; and every value, by the
    classes and checks :func:`calibrate` itself uses (empty, repeated or non-positive
    grid values, counts below their minimums, a ``max_step_bias`` <= 0, thresholds out
    of order, kernel hyperparameters the kernel refuses).

    Returns:
        the config as a dict; its ``"calibrate"`` entry holds :func:`calibrate`'s keyword
        arguments built from the table (``grid``, ``kernel``, ``kernel_hyperparameters``,
        ``health``, ``mala``, ...), those the table does not set left to their defaults.

    Raises:
        CalibrationConfigError: naming the offending key and what it expects.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            config = json.loads(text)
        else:
            config = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise CalibrationConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    return _check_config(config, f"config {path}")


def _resolve_factory(spec: str) -> Callable[..., Any]:
    """Import the factory ``"package.module:function"`` (``function`` may be dotted)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The module itself is missing, or it imports something that is not installed:
        # only the first is cured by sys.path.
        own = exc.name is None or module_name == exc.name or module_name.startswith(f"{exc.name}.")
        raise CalibrationConfigError(
            f"'factory' = {spec!r}: cannot import module {module_name!r} ({exc}); "
            + (
                "put its folder on sys.path (PYTHONPATH, or run from it) or install it"
                if own
                else f"it imports {exc.name!r}, which is not installed"
            )
        ) from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise CalibrationConfigError(
                f"'factory' = {spec!r}: module {module_name!r} has no attribute {attr!r}; "
                f"it defines {public}"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise CalibrationConfigError(f"'factory' = {spec!r} is not callable")
    return fn


def _inputs_from_factory(config: Mapping[str, Any]) -> dict[str, Any]:
    spec = config["factory"]
    factory = _resolve_factory(spec)
    kwargs = dict(config.get("factory_kwargs", {}))
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise CalibrationConfigError(
            f"[factory_kwargs] {kwargs} do not fit factory {spec!r}: {exc}"
        ) from None
    except ValueError:  # no signature to read (a builtin): let the call decide
        pass
    inputs = factory(**kwargs)
    if not isinstance(inputs, Mapping):
        raise CalibrationConfigError(
            f"factory {spec!r} must return a mapping, got {type(inputs).__name__}"
        )
    missing = sorted({"model", "loss_fn", "train_data", "eval_data", "components"} - set(inputs))
    unknown = sorted(set(inputs) - _FACTORY_KEYS)
    if missing or unknown:
        raise CalibrationConfigError(
            f"factory {spec!r} must return keys {sorted(_FACTORY_KEYS)} "
            f"(probe_data optional); missing {missing}, unknown {unknown}"
        )
    return dict(inputs)


def calibrate_from_config(
    config: Path | str,
    *,
    out: Path | None = None,
    components: Sequence[str] | None = None,
    progress: bool = False,
) -> tuple[CalibrationResult, dict[str, Path], Path]:
    """Run the calibration sweep a config file describes and save its results.

    The config names a factory ``"package.module:function"`` that returns a mapping
    with ``model``, ``loss_fn``, ``train_data``, ``eval_data``, ``components`` (a
    list of Components) and optionally ``probe_data``; ``factory_kwargs`` are passed to
    it; the ``calibrate`` table holds the sweep's settings (the keys of the module
    docstring's "Config files": the grid, the kernel and its own hyperparameters, the
    counts, ``max_step_bias``, ``[calibrate.health]`` and ``[calibrate.mala]``);
    ``out`` is the output folder (default ``runs/calibration``).

    The whole config is checked (:func:`load_config`), and the factory imported and its
    kwargs matched to its signature, before the factory is called or anything sampled.

    Args:
        config: the config file (TOML or JSON).
        out: output folder; ``None``: the config's ``out``.
        components: calibrate only these components (names); ``None``: all.
        progress: show progress bars.

    Returns:
        The result, the paths :meth:`CalibrationResult.save` wrote (``calibration.json``,
        ``calibration.csv``, ``summary.txt``, ``traces_<component>.png``) and the folder.

    Raises:
        CalibrationConfigError: an invalid config, a factory that cannot be imported or
            called with its kwargs, or one that returns the wrong keys.
        ValueError: a component name the factory does not return.
    """
    cfg = load_config(config)
    inputs = _inputs_from_factory(cfg)
    comps = list(inputs.pop("components"))
    if components:
        by_name = {c.name: c for c in comps}
        missing = sorted(set(components) - set(by_name))
        if missing:
            raise ValueError(f"unknown components {missing}; known: {sorted(by_name)}")
        comps = [by_name[c] for c in components]
    kwargs = dict(cfg["calibrate"])
    result = calibrate(
        inputs.pop("model"),
        inputs.pop("loss_fn"),
        inputs.pop("train_data"),
        comps,
        eval_data=inputs.pop("eval_data"),
        probe_data=inputs.pop("probe_data", None),
        progress=progress,
        **kwargs,
    )
    folder = out if out is not None else Path(cfg.get("out", "runs/calibration"))
    paths = result.save(folder)
    return result, paths, folder

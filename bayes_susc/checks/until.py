"""Sampling to a convergence target instead of a fixed length (issue 19).

:func:`sample_until` runs :func:`bayes_susc.sample` for ``num_draws`` kept draws per
chain, then judges every probe entry's χ by the R-hat and ESS of its product series
(:func:`bayes_susc.estimation.susceptibility.product_series`), and extends the run by
``Target.round_draws`` draws per chain (``resume_from``, bit for bit the same as one
uninterrupted run) until enough entries pass, the draw cap is reached or the time
budget is spent.

It lives in :mod:`bayes_susc.checks` because it needs both the sampler and the
statistics: ``bayes_susc.sampling`` and ``bayes_susc.estimation`` are independent
layers of the import contract (pyproject ``[tool.importlinter]``), which may not
import each other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bayes_susc.estimation.convergence import summary
from bayes_susc.estimation.response_matrix import (
    DEFAULT_MAX_RHAT,
    DEFAULT_MIN_DRAWS,
    DEFAULT_MIN_ESS,
)
from bayes_susc.estimation.susceptibility import product_series
from bayes_susc.kernels.base import Kernel, make_kernel
from bayes_susc.sampling import driver
from bayes_susc.storage.draws import Backend, get_group
from bayes_susc.validation import check_finite, check_int, check_positive

__all__ = ["Target", "TargetReport", "diagnose_entries", "draws_needed", "sample_until"]

REASON_REACHED = "target reached"
REASON_MAX_DRAWS = "max_draws reached"
REASON_BUDGET = "time budget spent"


def _check_value(name: str, check: Any, value: Any, **kw: Any) -> Any:
    """Run a validation helper, turning its TypeError into a ValueError that names the
    field (the project's helpers raise TypeError for a wrong type)."""
    try:
        return check(name, value, **kw)
    except TypeError as err:
        raise ValueError(str(err)) from None


@dataclass(frozen=True)
class Target:
    """When a run has enough draws: the response matrix's convergence rule, per entry.

    An entry (probe item) passes when the R-hat of its product series is at most
    ``max_rhat``, the smaller of its bulk and tail ESS is at least ``min_ess`` and the
    run has at least ``min_draws`` finite kept draws pooled over chains. Raises
    ``ValueError`` naming the field for an invalid value.

    Attributes:
        max_rhat: largest rank-normalized split R-hat that passes (dimensionless, ≥ 1).
        min_ess: smallest min(bulk ESS, tail ESS) that passes (effective draws, > 0).
        min_draws: smallest number of finite kept draws pooled over chains (≥ 0).
        fraction: share of entries that must pass, in (0, 1].
        round_draws: kept draws per chain added per round (≥ 1).
        max_draws: most kept draws per chain; no round goes beyond it (≥ 1).
        time_budget: seconds of wall clock for the whole :func:`sample_until` call
            (> 0), or ``None`` for no limit. The first round always runs; a later
            round starts only if, at the pace of the last round, it ends within it.
    """

    max_rhat: float = DEFAULT_MAX_RHAT
    min_ess: float = DEFAULT_MIN_ESS
    min_draws: int = DEFAULT_MIN_DRAWS
    fraction: float = 0.95
    round_draws: int = 100
    max_draws: int = 2000
    time_budget: float | None = None

    def __post_init__(self) -> None:
        # Frozen: normalize through object.__setattr__ (ints stay ints, floats floats).
        max_rhat = _check_value("max_rhat", check_finite, self.max_rhat)
        if max_rhat < 1.0:
            raise ValueError(f"max_rhat must be >= 1, got {self.max_rhat!r}")
        object.__setattr__(self, "max_rhat", max_rhat)
        object.__setattr__(self, "min_ess", _check_value("min_ess", check_positive, self.min_ess))
        object.__setattr__(
            self, "min_draws", _check_value("min_draws", check_int, self.min_draws, minimum=0)
        )
        fraction = _check_value("fraction", check_finite, self.fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        object.__setattr__(self, "fraction", fraction)
        object.__setattr__(
            self,
            "round_draws",
            _check_value("round_draws", check_int, self.round_draws, minimum=1),
        )
        object.__setattr__(
            self, "max_draws", _check_value("max_draws", check_int, self.max_draws, minimum=1)
        )
        if self.time_budget is not None:
            object.__setattr__(
                self, "time_budget", _check_value("time_budget", check_positive, self.time_budget)
            )


@dataclass(frozen=True)
class TargetReport:
    """How :func:`sample_until` ended.

    Attributes:
        reached: whether the share of passing entries reached ``Target.fraction``.
        reason: ``"target reached"``, ``"max_draws reached"`` or ``"time budget spent"``.
        rounds: one dict per round, in order: ``draws_per_chain`` (kept draws per chain
            after the round), ``pooled_draws`` (finite kept draws over all chains),
            ``fraction_passing`` (in [0, 1]), ``median_rhat``, ``median_ess`` (median over
            entries of R-hat and of min(bulk, tail) ESS; NaN entries ignored, NaN if all
            are) and ``seconds`` (wall clock of the round's sampling and diagnosis).
        draws_per_chain: kept draws per chain of the returned run.
        estimated_draws_per_chain: when not reached, the kept draws per chain at which
            ``fraction`` of the entries would pass, scaled from the last round
            (:func:`draws_needed`); ``None`` when reached, or when no entry has a finite
            ESS (e.g. all chains diverged).
    """

    reached: bool
    reason: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    draws_per_chain: int = 0
    estimated_draws_per_chain: int | None = None

    def summary(self) -> str:
        """One line per round, then the outcome (and the estimate when not reached)."""
        lines = [
            f"round {i + 1}: {r['draws_per_chain']} draws/chain, "
            f"{100 * r['fraction_passing']:.1f}% of entries pass, "
            f"median R-hat {r['median_rhat']:.4f}, median ESS {r['median_ess']:.0f}, "
            f"{r['seconds']:.1f} s"
            for i, r in enumerate(self.rounds)
        ]
        end = f"{self.reason} after {self.draws_per_chain} draws/chain"
        if self.estimated_draws_per_chain is not None:
            end += f"; about {self.estimated_draws_per_chain} draws/chain needed"
        return "\n".join([*lines, end])


def diagnose_entries(run: Any, target: Target, *, probe_chunk: int = 4096) -> dict[str, Any]:
    """Judge every probe entry of ``run`` against ``target``.

    Args:
        run: a result of :func:`bayes_susc.sample` (``posterior`` with ``phi``,
            ``eval_loss`` (chain, draw) and ``probe_loss`` (chain, draw, probe)).
        target: the thresholds (``fraction`` and the round settings are not used here).
        probe_chunk: probe entries judged at a time (≥ 1): the product series, its split
            chains and ranks exist for one chunk at once, so memory stays at about
            ``chains · draws · probe_chunk`` floats times a small factor.

    Returns:
        ``rhat`` and ``ess`` (min of bulk and tail ESS), arrays of shape ``(probe,)``;
        ``passing`` (bool, ``(probe,)``); ``pooled_draws`` (int, kept draws of the
        chains used); ``fraction_passing``, ``median_rhat`` and ``median_ess`` (floats,
        medians over non-NaN entries). The product series is pooled (grand means), as
        for χ, over the chains with only finite draws (diverged chains are left out, as
        in :func:`bayes_susc.estimate`); an entry with NaN statistics (e.g. a single
        chain left, whose R-hat is NaN) does not pass.
    """
    probe_chunk = _check_value("probe_chunk", check_int, probe_chunk, minimum=1)
    post = get_group(run, "posterior")
    phi = np.asarray(post["phi"].values, dtype=float)
    probe = post["probe_loss"].transpose("chain", "draw", "probe").values
    eval_loss = np.asarray(post["eval_loss"].values, dtype=float)[..., None]
    # Diverged chains (any non-finite draw) are left out, as estimate() leaves them out
    # of χ: the entries are judged on the chains that χ is computed from.
    keep = np.isfinite(phi).all(axis=1) & np.isfinite(probe).all(axis=(1, 2))
    keep &= np.isfinite(eval_loss[..., 0]).all(axis=1)
    pooled = int(keep.sum()) * phi.shape[1]
    num_probe = probe.shape[2]
    r, ess = np.full(num_probe, np.nan), np.full(num_probe, np.nan)
    if keep.any():
        for lo in range(0, num_probe, probe_chunk):
            block = slice(lo, min(lo + probe_chunk, num_probe))
            delta = np.asarray(probe[:, :, block][keep], dtype=float) - eval_loss[keep]
            stats = summary(product_series(phi[keep], delta))
            r[block] = np.asarray(stats["rhat"], dtype=float).reshape(-1)
            tail = np.asarray(stats["ess_tail"], dtype=float).reshape(-1)
            ess[block] = np.minimum(np.asarray(stats["ess_bulk"], dtype=float).reshape(-1), tail)
    # NaN compares False: an entry with NaN statistics never passes.
    passing = (r <= target.max_rhat) & (ess >= target.min_ess) & (pooled >= target.min_draws)
    return {
        "rhat": r,
        "ess": ess,
        "passing": passing,
        "pooled_draws": pooled,
        "fraction_passing": float(passing.mean()) if passing.size else 0.0,
        "median_rhat": _nanmedian(r),
        "median_ess": _nanmedian(ess),
    }


def _nanmedian(x: np.ndarray) -> float:
    """Median of the non-NaN values, NaN (without a warning) when there are none."""
    x = x[~np.isnan(x)]
    return float(np.median(x)) if x.size else math.nan


def draws_needed(diagnosis: Mapping[str, Any], draws: int, target: Target) -> int | None:
    """Kept draws per chain at which ``target.fraction`` of the entries would pass, by
    scaling the diagnosis of a run of ``draws`` draws per chain: ESS grows in proportion
    to the draws and R-hat − 1 falls like 1 / draws, so the entry at the
    (1 − fraction) quantile of ESS reaches ``min_ess`` after ``draws · min_ess / ESS``,
    and the one at the fraction quantile of R-hat reaches ``max_rhat`` after
    ``draws · (R-hat − 1) / (max_rhat − 1)``; at least ``min_draws`` pooled and at least
    ``draws``. An estimate from scaling, not a promise.

    Args:
        diagnosis: :func:`diagnose_entries` of the run (``rhat``, ``ess`` per entry,
            ``pooled_draws``).
        draws: the run's kept draws per chain.
        target: the thresholds and fraction.

    Returns:
        Draws per chain, or ``None`` when no entry has a finite ESS (e.g. every chain
        diverged).
    """
    ess = np.asarray(diagnosis["ess"], dtype=float)
    rhat = np.asarray(diagnosis["rhat"], dtype=float)
    if not np.isfinite(ess).any():
        return None
    chains = max(1, int(diagnosis["pooled_draws"]) // max(draws, 1))
    need = [draws, math.ceil(target.min_draws / chains)]
    low = float(np.nanquantile(ess, 1 - target.fraction))
    if low > 0:
        need.append(math.ceil(draws * target.min_ess / low))
    if np.isfinite(rhat).any() and target.max_rhat > 1:
        high = float(np.nanquantile(rhat, target.fraction)) - 1
        if high > 0:
            need.append(math.ceil(draws * high / (target.max_rhat - 1)))
    return max(need)


def sample_until(
    posterior: Any,
    kernel: str | Kernel = "sgld",
    *,
    eval_data: Any,
    probe_data: Any,
    target: Target | None = None,
    num_draws: int = 200,
    num_chains: int = 4,
    num_burnin: int = 0,
    steps_per_draw: int = 1,
    seed: int = 0,
    step_size: float | None = None,
    observables: Mapping[str, Any] | None = None,
    probe_coords: Mapping[str, Sequence[Any]] | None = None,
    chain_method: driver.ChainMethod = "vectorized",
    backend: Backend | None = None,
    progress: bool | None = None,
) -> tuple[Any, TargetReport]:
    """Sample until ``target`` is met, the draw cap is reached or the budget is spent.

    Round 1 is ``sample(..., num_draws=num_draws, keep_state=True)``; every later round
    extends every chain by ``target.round_draws`` kept draws (``resume_from``), so a
    run that stopped after R rounds equals, bit for bit on CPU, ``sample`` with
    ``num_draws + (R − 1) · round_draws`` draws and the same settings. After each round
    every probe entry is judged (:func:`diagnose_entries`); the loop stops with
    ``"target reached"`` once the share of passing entries is at least
    ``target.fraction``, with ``"max_draws reached"`` when the next round would go past
    ``target.max_draws`` draws per chain, and with ``"time budget spent"`` when, at the
    pace of the last round, the next one would end after ``target.time_budget`` seconds
    from the start of the call.

    Args:
        posterior: the :class:`bayes_susc.LocalPosterior` to sample.
        kernel: a registered kernel name or a kernel instance (give other
            hyperparameters through :func:`bayes_susc.make_kernel`).
        eval_data: the evaluation set, as for :func:`bayes_susc.sample`.
        probe_data: the probe items, as for :func:`bayes_susc.sample`.
        num_chains: independent chains (≥ 1).
        num_burnin: steps discarded before the first kept draw.
        steps_per_draw: kernel steps between kept draws.
        seed: master seed, as for :func:`bayes_susc.sample`.
        observables: extra ``name -> fn(model) -> Tensor`` recorded at each draw.
        probe_coords: metadata per probe item, stored on the ``probe`` dimension.
        chain_method: ``"vectorized"`` or ``"sequential"``.
        backend: ``"inferencedata"`` or ``"datatree"``; default follows ArviZ.
        target: the stopping rule; default ``Target()`` (the response matrix's
            thresholds, 95 % of entries, rounds of 100 draws, at most 2000 per chain).
        num_draws: kept draws per chain of the first round (≥ 1, ≤ ``max_draws``).
        step_size: the kernel's step size ε, only with a kernel name; ``None`` keeps
            the kernel's default.
        progress: print one line per round (draws per chain, share of entries passing)
            and show ``sample``'s progress bar; ``None`` (default): bar only when stderr
            is a terminal, no lines.

    Returns:
        ``(run, report)``: the run as :func:`bayes_susc.sample` returns it, with its
        ``sampler_state`` group (extendable further), and a :class:`TargetReport`.
        Every argument is validated before the first draw (``ValueError`` or
        ``TypeError`` naming it).
    """
    start = time.perf_counter()
    target = Target() if target is None else target
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {type(target).__name__}")
    num_draws = _check_value("num_draws", check_int, num_draws, minimum=1)
    if num_draws > target.max_draws:
        raise ValueError(
            f"max_draws ({target.max_draws}) must be at least num_draws ({num_draws}), "
            "the draws per chain of the first round"
        )
    num_chains = _check_value("num_chains", check_int, num_chains, minimum=1)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if step_size is not None and not isinstance(kernel, str):
        raise ValueError("step_size is only accepted with a kernel name, not an instance")
    # Resolve the kernel once: its hyperparameters are checked before sampling, and every
    # round uses the same instance, as resume_from requires the same kernel.
    kernel = make_kernel(kernel, **({} if step_size is None else {"step_size": step_size}))
    settings = dict(
        eval_data=eval_data,
        probe_data=probe_data,
        num_chains=num_chains,
        num_burnin=num_burnin,
        steps_per_draw=steps_per_draw,
        seed=seed,
        observables=observables,
        probe_coords=probe_coords,
        chain_method=chain_method,
        backend=backend,
        progress=progress,
    )
    # The remaining settings (posterior, data, seed, ...) are checked by sample itself
    # before its first step, so nothing is drawn with an invalid argument.
    rounds: list[dict[str, Any]] = []
    run, draws, reason = None, 0, REASON_MAX_DRAWS
    while True:
        t0 = time.perf_counter()
        add = num_draws if run is None else target.round_draws
        # Looked up on the module at call time (tests replace driver.sample).
        run = driver.sample(
            posterior,
            kernel,
            num_draws=add,
            keep_state=True,
            resume_from=run,
            **settings,
        )
        draws += add
        diag = diagnose_entries(run, target)
        rounds.append(
            {
                "draws_per_chain": draws,
                "pooled_draws": diag["pooled_draws"],
                "fraction_passing": diag["fraction_passing"],
                "median_rhat": diag["median_rhat"],
                "median_ess": diag["median_ess"],
                "seconds": time.perf_counter() - t0,
            }
        )
        if progress:
            tqdm.write(
                f"{draws} draws/chain: {100 * diag['fraction_passing']:.1f}% of entries "
                f"converged (target {100 * target.fraction:.1f}%)"
            )
        if diag["fraction_passing"] >= target.fraction:
            reason = REASON_REACHED
            break
        if draws + target.round_draws > target.max_draws:
            reason = REASON_MAX_DRAWS
            break
        if target.time_budget is not None:
            # Pace of the last round, scaled to the next round's draws.
            per_draw = rounds[-1]["seconds"] / add
            projected = time.perf_counter() - start + per_draw * target.round_draws
            if projected > target.time_budget:
                reason = REASON_BUDGET
                break
    reached = reason == REASON_REACHED
    estimate = None if reached else draws_needed(diag, draws, target)
    report = TargetReport(
        reached=reached,
        reason=reason,
        rounds=rounds,
        draws_per_chain=draws,
        estimated_draws_per_chain=estimate,
    )
    return run, report

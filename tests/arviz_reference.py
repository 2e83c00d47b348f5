"""ArviZ's own convergence statistics, the tests' reference, under either ArviZ generation.

ArviZ 0.x (Python 3.11 here) computes R-hat, ESS and MCSE itself; ArviZ ≥ 1.0
(Python ≥ 3.12) re-exports them from ``arviz-stats`` with new signatures. This module is
the one place that knows the difference: tests and benchmarks call :data:`SERIES` (one
``(chain, draw)`` array per call) and :func:`dataset_stats` (ArviZ's xarray route for a
multi-dimensional variable) and get the same definitions from both generations.

What changed between the generations, read from ``arviz_stats`` 1.3
(``base/diagnostics.py``, ``base/dataarray.py``, ``base/array.py``):

- **Tail ESS** (the one definition that moved). ArviZ 0.x always takes the smaller ESS
  of the indicators ``x <= q05`` and ``x <= q95``. arviz-stats takes a ``prob`` argument
  (``_ess_tail(ary, prob)``: ``min(qess(p), qess(1 - p))``): its array route requires it
  (``az.ess(array, method="tail")`` fails with ``_ess_tail() missing 1 required
  positional argument: 'prob'``) and its xarray route defaults it to
  ``rcParams["stats.ci_prob"]`` = 0.89, i.e. the 11 % and 89 % quantiles, so tail ESS
  with defaults differs from ArviZ 0.x (and from ours) by tens of percent. Passing
  ``prob=(0.05, 0.95)`` (:data:`TAIL_PROB`) reproduces ArviZ 0.x and
  :func:`bayes_susc.estimation.convergence.ess_tail` exactly, and ArviZ 0.x takes the
  same argument with the same meaning (it is its default), so the reference passes it to
  both; ``test_default_tail_ess_of_each_generation`` asserts each generation's default.
- An edge case, not a definition: where a tail quantile falls between two infinite
  draws, arviz-stats' ``np.quantile(method="linear")`` gives NaN (-inf − -inf), so that
  indicator is all False; ArviZ 0.x and ours give -inf. ``test_edge_cases_equal_arviz``
  asserts this one entry separately.
- Everything else used here (rank R-hat, bulk / mean ESS, MCSE of the mean and of the
  sd; NaN for fewer than 4 draws, NaN R-hat for one chain) has the same definition, so
  the tests hold both generations to the same tolerance.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from bayes_susc.storage.draws import arviz_major, available_backends

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.2x's refactor notice
    import arviz as az

ARVIZ_MAJOR = arviz_major()
"""0 for ArviZ 0.x (InferenceData), 1 for ArviZ 1.x (DataTree, arviz-stats)."""

BACKENDS = available_backends()
"""Containers the installed ArviZ can build: ("inferencedata", "datatree") or ("datatree",)."""

TAIL_PROB = (0.05, 0.95)
"""The tail quantiles of our tail ESS: ArviZ 0.x's default, given explicitly to both generations."""

ARVIZ1_DEFAULT_TAIL_PROB = (0.11, 0.89)
"""ArviZ 1.x's tail quantiles when ``prob`` is not given (xarray route): 1 − ci_prob, ci_prob."""


SERIES: dict[str, Callable[[np.ndarray], float]] = {
    "rhat": lambda s: az.rhat(s, method="rank"),
    "ess_bulk": lambda s: az.ess(s, method="bulk", relative=False),
    "ess_tail": lambda s: az.ess(s, method="tail", relative=False, prob=TAIL_PROB),
    "ess_mean": lambda s: az.ess(s, method="mean", relative=False),
    "mcse_mean": lambda s: az.mcse(s, method="mean"),
    "mcse_sd": lambda s: az.mcse(s, method="sd"),
}
"""Statistic name → ArviZ on one ``(chain, draw)`` array, same definition in 0.x and 1.x."""


def mcse_mean(series: np.ndarray) -> float:
    """ArviZ's MCSE of the mean of one ``(chain, draw)`` series."""
    return float(SERIES["mcse_mean"](np.asarray(series)))


def looped(x: np.ndarray, name: str) -> np.ndarray:
    """ArviZ's statistic ``name`` looped over the entries of ``x`` (chain, draw, *entries),
    shaped like the entries; warnings (NaN, short arrays) are silenced."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        values = [float(SERIES[name](flat[:, :, i])) for i in range(flat.shape[2])]
    return np.array(values).reshape(x.shape[2:])


def dataset_stats(x: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """ArviZ's route for a multi-dimensional variable: ``x`` (chain, draw, *entries) as
    one variable of a Dataset, each statistic in ``names`` (``rhat``, ``ess_bulk``,
    ``ess_tail``, ``mcse_mean``) over all entries at once; arrays shaped like the entries."""
    ds = az.convert_to_dataset({"w": x})
    calls = {
        "rhat": lambda: az.rhat(ds, method="rank"),
        "ess_bulk": lambda: az.ess(ds, method="bulk"),
        "ess_tail": lambda: az.ess(ds, method="tail", prob=TAIL_PROB),
        "mcse_mean": lambda: az.mcse(ds, method="mean"),
    }
    return {name: np.asarray(calls[name]()["w"].values) for name in names}


def default_tail_ess(x: np.ndarray) -> np.ndarray:
    """The installed ArviZ's tail ESS with its default ``prob`` (xarray route), for
    asserting the documented difference between the generations."""
    ds = az.convert_to_dataset({"w": x})
    return np.asarray(az.ess(ds, method="tail")["w"].values)

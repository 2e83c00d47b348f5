"""Vectorized convergence diagnostics against ArviZ looped over series.

Both sides compute R-hat (rank), bulk ESS, tail ESS and MCSE of the mean for the same
4 chains x 200 draws x N series (AR(1) series with autocorrelations from -0.3 to 0.95,
a quarter of them with shifted chain means). Ours is ``bayes_susc.estimation.convergence.summary``
on the whole array. ArviZ is timed two ways on a subset of the series and extrapolated
linearly to N (its cost per series is constant: it handles one series at a time):

- ``loop``: ``az.rhat`` / ``az.ess`` / ``az.mcse`` on each ``(chain, draw)`` array;
- ``dataset``: the same four calls on an xarray Dataset holding the subset as one
  variable, ArviZ's own route for multi-dimensional variables.

The ratio is taken against the faster ArviZ route. The values are checked to agree on
the timed subset. Prints a table and writes ``--out DIR/results.json``.

Runs under ArviZ 0.x and 1.x: the ArviZ calls go through ``tests/arviz_reference.py``,
which passes ArviZ 1.x the tail quantiles (5 %, 95 %) that 0.x and ours use (1.x's
default is 11 %, 89 %). Run it from the repository root (``tests`` is not installed).

    python -m benchmarks.convergence_vs_arviz [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
from scipy import signal

from bayes_susc.estimation.convergence import summary
from tests.arviz_reference import SERIES, az, dataset_stats

N_CHAINS, N_DRAWS = 4, 200
KEYS = ("rhat", "ess_bulk", "ess_tail", "mcse_mean")
RTOL = 1e-6


def make_series(n_series: int, seed: int = 0) -> np.ndarray:
    """(chain, draw, series): AR(1) with varied autocorrelation, some with shifted chains."""
    rng = np.random.default_rng(seed)
    phi = np.linspace(-0.3, 0.95, n_series)
    noise = rng.standard_normal((n_series, N_CHAINS, N_DRAWS))
    x = np.empty_like(noise)
    for p in np.unique(phi):  # lfilter takes one coefficient set per call
        rows = phi == p
        x[rows] = signal.lfilter([1.0], [1.0, -p], noise[rows], axis=-1)
    x[::4] += np.arange(N_CHAINS)[:, None]  # R-hat >> 1 for every fourth series
    return np.ascontiguousarray(np.moveaxis(x, 0, -1))


def arviz_loop(x: np.ndarray) -> dict[str, np.ndarray]:
    out = {k: np.empty(x.shape[2]) for k in KEYS}
    for i in range(x.shape[2]):
        s = x[:, :, i]
        for k in KEYS:
            out[k][i] = SERIES[k](s)
    return out


def arviz_dataset(x: np.ndarray) -> dict[str, np.ndarray]:
    return dataset_stats(x, KEYS)


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Smallest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def max_rel_diff(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for k in KEYS:
        a, b = np.asarray(ours[k], float), np.asarray(ref[k], float)
        worst = max(worst, float(np.max(np.abs(a - b) / np.abs(b))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 200 only")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_convergence"))
    parser.add_argument("--subset", type=int, default=200, help="series ArviZ is timed on")
    parser.add_argument("--repeats", type=int, default=3, help="timings keep the best of these")
    args = parser.parse_args()
    logging.getLogger("arviz").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", RuntimeWarning)

    sizes = [200] if args.quick else [1_000, 10_000]
    print(
        f"R-hat + ESS bulk + ESS tail + MCSE mean, {N_CHAINS} chains x {N_DRAWS} draws x N series"
    )
    print(
        f"ArviZ timed on the first {args.subset} series (best of {args.repeats}) and "
        "extrapolated linearly to N; ours timed on all N series."
    )
    header = (
        f"{'N':>7} {'ours s':>8} {'arviz loop s':>13} {'arviz dataset s':>16} "
        f"{'ratio':>7} {'max rel diff':>13}"
    )
    print(header)
    rows = []
    for n in sizes:
        x = make_series(n)
        k = min(args.subset, n)
        sub = np.ascontiguousarray(x[:, :, :k])
        t_ours, ours = best_time(lambda x=x: summary(x), args.repeats)
        t_loop, ref_loop = best_time(lambda sub=sub: arviz_loop(sub), args.repeats)
        t_ds, ref_ds = best_time(lambda sub=sub: arviz_dataset(sub), args.repeats)
        ours_sub = {key: v[:k] for key, v in ours.items()}
        diff = max(max_rel_diff(ours_sub, ref_loop), max_rel_diff(ours_sub, ref_ds))
        loop_extrap, ds_extrap = t_loop * n / k, t_ds * n / k
        ratio = min(loop_extrap, ds_extrap) / t_ours
        rows.append(
            {
                "n_series": n,
                "ours_s": t_ours,
                "ours_us_per_series": 1e6 * t_ours / n,
                "arviz_subset_series": k,
                "arviz_loop_subset_s": t_loop,
                "arviz_dataset_subset_s": t_ds,
                "arviz_loop_extrapolated_s": loop_extrap,
                "arviz_dataset_extrapolated_s": ds_extrap,
                "arviz_extrapolated": k < n,
                "ratio_vs_faster_arviz": ratio,
                "max_rel_diff_on_subset": diff,
                "values_agree": bool(diff <= RTOL),
            }
        )
        extrap = "*" if k < n else " "
        print(
            f"{n:>7} {t_ours:>8.3f} {loop_extrap:>12.2f}{extrap} {ds_extrap:>15.2f}{extrap} "
            f"{ratio:>6.1f}x {diff:>13.1e}"
        )
        if diff > RTOL:
            raise SystemExit(f"values disagree with ArviZ: max relative difference {diff:.2e}")
    if any(r["arviz_extrapolated"] for r in rows):
        print(f"* extrapolated linearly from {args.subset} series")
    print("ratio = faster ArviZ route / ours; values agree with ArviZ to rtol 1e-6 on the subset")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "convergence_vs_arviz",
        "statistics": list(KEYS),
        "chains": N_CHAINS,
        "draws": N_DRAWS,
        "quick": args.quick,
        "repeats": args.repeats,
        "note": "ArviZ timed on a subset of series and extrapolated linearly to N",
        "versions": {
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "arviz": az.__version__,
            "python": platform.python_version(),
        },
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "results": rows,
    }
    path = args.out / "results.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Vectorized convergence diagnostics equal ArviZ's, entry by entry.

The reference is ArviZ itself, looped over the entries of the same array
(``az.rhat(x[..., i])`` etc.): ArviZ 0.23 on Python 3.11, ArviZ 1.x (arviz-stats) on
Python ≥ 3.12, both through ``tests/arviz_reference.py``, which passes ArviZ 1.x the
tail quantiles of our (and 0.23's) tail ESS (1.x changed their default; see there and
``test_default_tail_ess_of_each_generation``). The statistics are deterministic
functions of the draws, so the tolerance is floating-point rounding (rtol 1e-6), not
Monte Carlo error, on both generations.
"""

from __future__ import annotations

import logging
import warnings
import zlib

import numpy as np
import pytest
from arviz_reference import (
    ARVIZ1_DEFAULT_TAIL_PROB,
    ARVIZ_MAJOR,
    SERIES,
    dataset_stats,
    default_tail_ess,
    looped,
)
from scipy import signal, stats

from bayes_susc.estimation import convergence
from bayes_susc.estimation.convergence import (
    ess_bulk,
    ess_mean,
    ess_tail,
    mcse_mean,
    mcse_sd,
    rhat,
    summary,
)

RTOL = 1e-6

OURS = {
    "rhat": rhat,
    "ess_bulk": ess_bulk,
    "ess_tail": ess_tail,
    "ess_mean": ess_mean,
    "mcse_mean": mcse_mean,
    "mcse_sd": mcse_sd,
}

ARVIZ = SERIES  # name -> ArviZ on one (chain, draw) series, either generation


@pytest.fixture(autouse=True, scope="module")
def _quiet_arviz():
    """ArviZ logs a warning for every NaN or short array; the tests provoke them on purpose."""
    logger = logging.getLogger("arviz")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def arviz_reference(x: np.ndarray, name: str) -> np.ndarray:
    """ArviZ's statistic looped over the entries of x (chain, draw, *entries)."""
    return looped(x, name)


def ar1(rng: np.random.Generator, shape: tuple[int, ...], phi: float) -> np.ndarray:
    """AR(1) series x_t = phi x_{t-1} + e_t along the draw axis (axis 1)."""
    return signal.lfilter([1.0], [1.0, -phi], rng.standard_normal(shape), axis=1)


def make_case(name: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name.startswith("ar1_"):
        phi = float(name.removeprefix("ar1_"))
        return ar1(rng, (4, 200, 8), phi)
    if name == "shifted_means":  # R-hat >> 1
        return ar1(rng, (4, 200, 8), 0.5) + np.array([0.0, 0.0, 2.0, 4.0])[:, None, None]
    if name == "heavy_tails":
        return rng.standard_cauchy((4, 200, 8))
    if name == "student_t_ar":
        return signal.lfilter([1.0], [1.0, -0.7], rng.standard_t(1.5, (3, 150, 8)), axis=1)
    if name == "one_chain":
        return ar1(rng, (1, 300, 8), 0.6)
    if name == "odd_draws":
        return ar1(rng, (3, 101, 8), 0.4)
    if name == "minimal_draws":  # 4 draws: split chains of 2
        return rng.standard_normal((2, 4, 8))
    if name == "five_draws":
        return ar1(rng, (4, 5, 8), 0.3)
    if name == "short_draws":  # Geyer's sequence runs to the last lag pair
        return ar1(rng, (4, 11, 40), 0.3)
    if name == "discrete_ties":
        return rng.integers(0, 4, (4, 60, 8)).astype(float)
    if name == "many_chains":
        return ar1(rng, (8, 50, 8), 0.8)
    if name == "mixed_4x200":
        phis = np.linspace(-0.5, 0.95, 12)
        return np.stack([ar1(rng, (4, 200), p) for p in phis], axis=-1) * np.geomspace(
            1e-3, 1e3, 12
        )
    raise KeyError(name)


CASES = [
    "ar1_0.0",
    "ar1_0.5",
    "ar1_0.9",
    "ar1_0.99",
    "ar1_-0.6",
    "shifted_means",
    "heavy_tails",
    "student_t_ar",
    "one_chain",
    "odd_draws",
    "minimal_draws",
    "five_draws",
    "short_draws",
    "discrete_ties",
    "many_chains",
    "mixed_4x200",
]


@pytest.mark.parametrize("case", CASES)
def test_equals_arviz(case: str) -> None:
    x = make_case(case)
    for name, fn in OURS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ours handles edge cases without warnings
            ours = fn(x)
        expected = arviz_reference(x, name)
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=0, err_msg=f"{case}: {name}")


def test_float32_input() -> None:
    """R-hat and ESS equal ArviZ's; the MCSEs differ by ArviZ's float32 accumulation.

    ArviZ folds float32 draws about their median in float32 (which we reproduce: the
    rounding decides ties in the tail R-hat) and computes the sd and the squared
    deviations of the MCSEs in float32 (which we do in float64, so those two differ
    from ArviZ by float32 rounding, ~1e-7 to ~1e-6 relative).
    """
    rng = np.random.default_rng(11)
    x = (100.0 + 3.0 * ar1(rng, (4, 200, 40), 0.6)).astype(np.float32)
    for name, fn in OURS.items():
        rtol = 2e-5 if name.startswith("mcse") else RTOL
        np.testing.assert_allclose(fn(x), arviz_reference(x, name), rtol=rtol, err_msg=name)


def test_shifted_chains_have_large_rhat() -> None:
    r = rhat(make_case("shifted_means"))
    assert np.all(r > 1.5)
    assert np.all(rhat(make_case("ar1_0.0")) < 1.05)


def test_single_chain_rhat_is_nan_but_ess_is_not() -> None:
    x = make_case("one_chain")
    assert np.all(np.isnan(rhat(x)))
    assert np.all(np.isfinite(ess_bulk(x)))


def edge_case_array() -> np.ndarray:
    """4 x 200 x 10 entries, most of them pathological."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 200, 10))
    x[:, :, 0] = 3.0  # constant
    x[1, 5, 1] = np.nan  # one NaN draw
    x[:, :, 2] = np.nan  # all NaN
    x[0, 3, 3] = np.inf  # one inf draw
    x[2, :, 4] = -np.inf  # a whole chain at -inf
    x[:, :, 5] = np.arange(4.0)[:, None]  # each chain constant, chains differ
    x[:, :, 6] = 1e-17 * rng.standard_normal((4, 200))  # range below float resolution
    x[:, :, 7] = rng.integers(0, 2, (4, 200))  # binary
    # +-1 in equal numbers: folded draws are constant, so the tail R-hat is NaN and
    # ArviZ's max(bulk, tail) returns the bulk R-hat.
    x[:, :, 9] = rng.permutation(np.repeat([-1.0, 1.0], 400)).reshape(4, 200)
    return x  # entry 8 stays a healthy normal series


# Entry 4 of edge_case_array (a whole chain at -inf): ArviZ 1.x takes the tail quantiles
# with np.quantile(method="linear"), which interpolates between two -inf draws as
# -inf + 0 * (-inf - -inf) = NaN; every indicator x <= NaN is False, that indicator's ESS
# is the number of draws, and its tail ESS is the 95 % indicator's alone. ArviZ 0.x
# (scipy's mquantiles) and ours give q05 = -inf, whose indicator marks the -inf chain.
INF_CHAIN_ENTRY = 4


def test_edge_cases_equal_arviz(monkeypatch: pytest.MonkeyPatch) -> None:
    x = edge_case_array()
    for name, fn in OURS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = fn(x)
        ref = arviz_reference(x, name)
        if ARVIZ_MAJOR >= 1 and name == "ess_tail":
            keep = np.arange(x.shape[2]) != INF_CHAIN_ENTRY
            np.testing.assert_allclose(ours[keep], ref[keep], rtol=RTOL, atol=0, err_msg=name)
            # The documented difference: ArviZ 1.x is our 95 %-indicator ESS there.
            assert ours[INF_CHAIN_ENTRY] < 10 and ref[INF_CHAIN_ENTRY] > 700
            with monkeypatch.context() as m:
                m.setattr(convergence, "TAIL_PROBS", (0.95, 0.95))
                upper = fn(x)[INF_CHAIN_ENTRY]
            np.testing.assert_allclose(ref[INF_CHAIN_ENTRY], upper, rtol=RTOL)
            continue
        np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=0, err_msg=name)


def test_nan_entries_do_not_spoil_others() -> None:
    x = edge_case_array()
    clean = x[:, :, [8]]
    for name, fn in OURS.items():
        values = fn(x)
        assert np.isnan(values[1]) and np.isnan(values[2]), name
        np.testing.assert_allclose(values[8], fn(clean)[0], rtol=1e-12, err_msg=name)


def test_constant_entry_as_arviz() -> None:
    """ArviZ: NaN R-hat and mcse_sd, but ESS = number of split draws and mcse_mean = 0."""
    x = np.full((4, 201, 2), 2.5)
    assert np.all(np.isnan(rhat(x)))
    for fn in (ess_bulk, ess_tail, ess_mean):
        np.testing.assert_array_equal(fn(x), 800.0)
    np.testing.assert_array_equal(mcse_mean(x), 0.0)
    assert np.all(np.isnan(mcse_sd(x)))


@pytest.mark.parametrize("n_draw", [1, 2, 3])
def test_too_few_draws_are_nan(n_draw: int) -> None:
    x = np.random.default_rng(n_draw).standard_normal((4, n_draw, 3))
    for name, fn in OURS.items():
        assert np.all(np.isnan(fn(x))), name
        assert np.all(np.isnan(arviz_reference(x, name))), name


def test_shapes_with_two_entry_dims() -> None:
    rng = np.random.default_rng(3)
    x = ar1(rng, (4, 120, 3, 5), 0.7)
    flat = x.reshape(4, 120, 15)
    for name, fn in OURS.items():
        values = fn(x)
        assert values.shape == (3, 5), name
        np.testing.assert_array_equal(values.reshape(15), fn(flat), err_msg=name)
    # ArviZ's own route for multi-dimensional variables (xarray ufunc over the entries).
    ref = dataset_stats(x, ("rhat", "ess_tail"))
    np.testing.assert_allclose(rhat(x), ref["rhat"], rtol=RTOL)
    np.testing.assert_allclose(ess_tail(x), ref["ess_tail"], rtol=RTOL)


def test_default_tail_ess_of_each_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """ArviZ 0.x's tail ESS is ours (5 % / 95 % quantiles); ArviZ 1.x's default is the
    same definition at the 11 % / 89 % quantiles (prob = rcParams["stats.ci_prob"] =
    0.89), which the reference above overrides with prob=(0.05, 0.95)."""
    x = ar1(np.random.default_rng(3), (4, 120, 3, 5), 0.7)
    default = default_tail_ess(x)
    ours = ess_tail(x)
    if ARVIZ_MAJOR < 1:
        np.testing.assert_allclose(default, ours, rtol=RTOL)
        return
    # The two definitions differ by far more than rounding on these series ...
    assert np.max(np.abs(default / ours - 1.0)) > 0.1
    # ... and ours at ArviZ 1.x's default quantiles is ArviZ 1.x's default.
    monkeypatch.setattr(convergence, "TAIL_PROBS", ARVIZ1_DEFAULT_TAIL_PROB)
    np.testing.assert_allclose(ess_tail(x), default, rtol=RTOL)


def test_no_entry_dims_returns_scalar() -> None:
    x = ar1(np.random.default_rng(4), (4, 200), 0.5)
    for name, fn in OURS.items():
        value = fn(x)
        assert np.ndim(value) == 0 and isinstance(value, float), name
        np.testing.assert_allclose(value, float(ARVIZ[name](x)), rtol=RTOL, err_msg=name)


def test_zero_entries() -> None:
    out = summary(np.zeros((4, 200, 0, 3)))
    assert all(v.shape == (0, 3) for v in out.values())


def test_summary_matches_functions() -> None:
    x = make_case("mixed_4x200")
    out = summary(x)
    assert set(out) == {"rhat", "ess_bulk", "ess_tail", "mcse_mean"}
    for name, values in out.items():
        np.testing.assert_array_equal(values, OURS[name](x), err_msg=name)


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    x = edge_case_array()
    whole = {name: fn(x) for name, fn in OURS.items()}
    monkeypatch.setattr(convergence, "_CHUNK_ELEMENTS", 1000)  # 2 entries per chunk
    for name, fn in OURS.items():
        np.testing.assert_array_equal(fn(x), whole[name], err_msg=name)


def test_rank_normalisation_equals_rankdata() -> None:
    rng = np.random.default_rng(5)
    for a in (rng.standard_normal((6, 50)), rng.integers(0, 4, (6, 50)).astype(float)):
        z = convergence._z_scale(a[:, None, :])[:, 0, :]
        ranks = stats.rankdata(a, method="average", axis=1)
        expected = stats.norm.ppf((ranks - 3 / 8) / (a.shape[1] - 2 * 3 / 8 + 1))
        np.testing.assert_array_equal(z, expected)


def test_rejects_one_dimensional_input() -> None:
    with pytest.raises(ValueError, match=r"shape \(chain, draw, \*entries\).*got shape \(10,\)"):
        rhat(np.zeros(10))

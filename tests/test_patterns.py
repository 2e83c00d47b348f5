"""Token patterns: exact assignment on hand-checked texts, pattern χ, standardization,
cluster enrichment, and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from scipy import stats
from statsmodels.stats.multitest import multipletests
from synthetic import ar1

from bayes_susc.estimation.patterns import (
    PATTERNS,
    assign_patterns,
    pattern_enrichment,
    pattern_matrix,
    patterns_from_coords,
)
from bayes_susc.estimation.susceptibility import estimate_many

# Character-level windows (one token per character, as the byte-level demo).
# Positions of CODE (0-based):
#   x0 ␣1 =2 ␣3 f4 (5 16 )7 \n8 ␣9 ␣10 s11 ␣12 =13 ␣14 "15 a16 #17 b18 "19 ␣20 #21 ␣22
#   h23 e24 y25 \n26 y27 ␣28 =29 ␣30 f31 (32 233 )34
CODE = 'x = f(1)\n  s = "a#b" # hey\ny = f(2)'
# Positions of PROSE: t0 h1 e2 ␣3 c4 a5 t6 ␣7 s8 a9 w10 ␣11 t12 h13 e14 ␣15 c16 a17 t18
#   '19 s20 ␣21 h22 a23 t24
PROSE = "the cat saw the cat's hat"

# Expected members (window positions) per pattern, worked out by hand from the rules.
CODE_EXPECTED = {
    # blanks after a non-blank on their line; 9 and 10 follow the newline at 8
    "whitespace": [1, 3, 12, 14, 20, 22, 28, 30],
    "newline": [8, 26],
    "indentation": [9, 10],
    # letters after a non-word char: f, s, a (after "), b (after #), h, y (after \n), f
    "word_start": [4, 11, 16, 18, 23, 27, 31],
    "word_interior": [24],  # the e of "hey"
    # word chars before a non-word char, digits included: f( 1) s␣ a# b" y\n y␣ f( 2)
    "word_end": [4, 6, 11, 16, 18, 25, 27, 31, 33],
    "digit": [6, 33],
    "punctuation": [2, 13, 17, 21, 29],  # = = # # =
    "bracket_open": [5, 32],
    "bracket_close": [7, 34],
    "quote": [15, 19],
    "inside_string": [16, 17, 18],  # a#b: the # inside the string starts no comment
    "inside_comment": [22, 23, 24, 25],  # " hey" after the second #, not the newline
    # k = 2: " =" at 12 was followed by " " at 1..3; " =" / "= " / " f" at 28..32 copy
    # lines 1-2; "f(" at 31 was followed by 1, not 2, so 33 is not a continuation
    "induction_continuation": [14, 30, 31, 32],
    # first occurrences of recurring bigrams " =" (1), "= " (2), " f" (3), "f(" (4)
    "repeat_first": [3, 4, 5, 6],
}
PROSE_EXPECTED = {
    "whitespace": [3, 7, 11, 15, 21],
    "word_start": [4, 8, 12, 16, 20, 22],
    "word_interior": [1, 5, 9, 13, 17, 23],
    # 24 (the last t) is in no word pattern: the next character is outside the window
    "word_end": [2, 6, 10, 14, 18, 20],
    "quote": [19],  # the apostrophe; prose has no strings, so no inside_string
    # "the cat" recurs: 14..18 copy 2..6; 19 (') differs from 7 (space)
    "induction_continuation": [14, 15, 16, 17, 18],
    # first occurrences of th, he, "e ", " c", ca, at: the tokens 2..7 after them
    "repeat_first": [2, 3, 4, 5, 6, 7],
}


def members(mask: np.ndarray, offset: int = 1) -> list[int]:
    """Window positions of a probe mask whose probes start at position ``offset``."""
    return (np.flatnonzero(mask) + offset).tolist()


# ------------------------------------------------------------------------- assignment


def test_code_window_patterns_exact():
    masks = assign_patterns([CODE], ["code"])
    assert list(masks) == list(PATTERNS)
    assert all(m.shape == (34,) and m.dtype == bool for m in masks.values())
    for name in PATTERNS:
        assert members(masks[name]) == CODE_EXPECTED[name], name
    counts = {name: int(m.sum()) for name, m in masks.items()}
    assert counts["whitespace"] == 8
    assert counts["word_end"] == 9
    assert counts["inside_comment"] == 4
    # Every position 1..34 has at least one pattern.
    assert np.logical_or.reduce(list(masks.values())).all()


def test_prose_window_patterns_exact_and_k():
    masks = assign_patterns([PROSE], ["prose"])
    for name in PATTERNS:
        assert members(masks[name]) == PROSE_EXPECTED.get(name, []), name
    # The last token (position 24, probe index 23) is only unknown-context: no pattern.
    assert not any(m[23] for m in masks.values())
    # k = 3: "the cat" copies from position 15 on ("the" -> ' '); first copies 3..7.
    k3 = assign_patterns([PROSE], ["prose"], induction_k=3)
    assert members(k3["induction_continuation"]) == [15, 16, 17, 18]
    assert members(k3["repeat_first"]) == [3, 4, 5, 6, 7]
    # first_position = 0 adds position 0, which has no known previous character.
    m0 = assign_patterns([PROSE], ["prose"], first_position=0)
    assert m0["word_start"].shape == (25,)
    assert members(m0["word_start"], offset=0) == PROSE_EXPECTED["word_start"]


def test_windows_flattened_window_major_and_kind_matters():
    masks = assign_patterns([CODE, PROSE], ["code", "prose"])
    assert masks["quote"].shape == (34 + 24,)
    assert members(masks["quote"][:34]) == [15, 19]
    assert members(masks["quote"][34:]) == [19]
    # The same text with a string: only a code window has strings and comments.
    text = 'x "ab" # c'
    both = assign_patterns([text, text], ["code", "prose"])
    assert members(both["inside_string"][:9]) == [3, 4]
    assert members(both["inside_comment"][:9]) == [8, 9]
    assert both["inside_string"][9:].sum() == 0
    assert both["inside_comment"][9:].sum() == 0
    # Multi-character tokens: classes need every character; neighbours are characters.
    toks = assign_patterns([["def", " ", "foo", "(", "):"]], ["code"])
    assert toks["word_start"].tolist() == [False, True, False, False]
    assert toks["word_end"].tolist() == [False, True, False, False]
    assert toks["punctuation"].tolist() == [False, False, False, False]  # "):" is mixed


def test_patterns_from_coords_matches_assign_patterns():
    windows = [list(CODE[:25]), list(PROSE)]
    flat = assign_patterns(windows, ["code", "prose"])
    coords = {
        "dataset": np.repeat(["code", "prose"], 24),
        "sequence": np.repeat([0, 1], 24),
        "position": np.tile(np.arange(1, 25), 2),
        "token": [t for w in windows for t in w[1:]],
    }
    by_coords = patterns_from_coords(coords, windows)
    for name in PATTERNS:
        np.testing.assert_array_equal(by_coords[name], flat[name])
    # A response matrix in another probe order gives the masks in its order.
    order = np.random.default_rng(0).permutation(48)
    ds = xr.Dataset(
        {"chi": ("probe", np.zeros(48))},
        coords={k: ("probe", np.asarray(v)[order]) for k, v in coords.items()},
    )
    shuffled = patterns_from_coords(ds, windows)
    np.testing.assert_array_equal(shuffled["word_end"], flat["word_end"][order])
    bad = dict(coords, token=["?"] + coords["token"][1:])
    with pytest.raises(ValueError, match="windows do not match"):
        patterns_from_coords(bad, windows)


# ------------------------------------------------------------------------ pattern χ


def synthetic_runs(seed: int = 0, components: int = 3, probes: int = 12) -> dict:
    """φ and ΔL that covary with probe-specific loadings (AR(1) in draws)."""
    rng = np.random.default_rng(seed)
    runs = {}
    for c in range(components):
        phi = ar1(rng, (4, 200), 0.5)
        delta = 0.5 * phi[..., None] * rng.standard_normal(probes) + ar1(rng, (4, 200, probes), 0.4)
        runs[f"H{c}"] = {"phi": phi, "delta_loss": delta}
    return runs


def test_pattern_chi_is_mean_of_member_chi():
    runs = synthetic_runs()
    patterns = {
        "a": np.isin(np.arange(12), [0, 1, 2, 3, 4]),
        "b": np.isin(np.arange(12), [3, 4, 5, 9]),  # overlaps a
        "c": np.ones(12, dtype=bool),
        "empty": np.zeros(12, dtype=bool),
    }
    tokens = estimate_many(runs)
    ds = pattern_matrix(runs, patterns)
    assert ds["chi"].dims == ("pattern", "component")
    assert list(ds["pattern"].values) == ["a", "b", "c"]
    assert ds["num_tokens"].values.tolist() == [5, 4, 12]
    assert ds.attrs["dropped_patterns"] == "empty"
    assert "empty" in ds.attrs["note"]
    for name in ("a", "b", "c"):
        for comp in runs:
            want = tokens["chi"].sel(component=comp).values[patterns[name]].mean()
            got = ds["chi"].sel(pattern=name, component=comp).item()
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert set(np.unique(ds["status"].values)) <= {
        "ok",
        "rhat",
        "ess",
        "ci_contains_zero",
        "not_significant_bh",
    }
    np.testing.assert_array_equal(ds["reliable"].values, ds["status"].values == "ok")
    # BH family: the 9 pattern entries.
    _, q, _, _ = multipletests(ds["p_value"].values.ravel(), method="fdr_bh")
    np.testing.assert_allclose(ds["q_value"].values.ravel(), q, rtol=1e-12)
    # A per-component flag carried over gives that column its status.
    flags = xr.Dataset({"stuck": ("component", [False, True, False])}, coords=tokens.coords)
    flagged = pattern_matrix(runs, patterns, component_flags=flags)
    assert (flagged["status"].sel(component="H1").values == "stuck").all()


# ----------------------------------------------------------------------- enrichment


def test_enrichment_hypergeometric_and_bh():
    labels = np.array([0] * 10 + [1] * 10 + [-1] * 2)
    planted = np.zeros(22, dtype=bool)
    planted[:8] = True
    planted[20:] = True  # ignored probes: not in the population
    uniform = np.zeros(22, dtype=bool)
    uniform[0:20:2] = True
    df = pattern_enrichment(
        labels, {"planted": planted, "uniform": uniform, "none": np.zeros(22, bool)}
    )
    assert df.attrs["N"] == 20
    assert df.attrs["dropped_patterns"] == ["none"]
    assert df[["cluster", "pattern"]].values.tolist() == [
        [0, "planted"],
        [0, "uniform"],
        [1, "planted"],
        [1, "uniform"],
    ]
    assert df["count"].tolist() == [8, 5, 0, 5]
    assert df["pattern_size"].tolist() == [8, 10, 8, 10]
    np.testing.assert_allclose(df["expected"], [4.0, 5.0, 4.0, 5.0])
    np.testing.assert_allclose(df["fold_enrichment"], [2.0, 1.0, 0.0, 1.0])
    # P(X >= 8), X ~ Hypergeom(N=20, K=8, n=10): C(8,8)·C(12,2)/C(20,10) = 66/184756.
    p_planted = 66 / math.comb(20, 10)
    assert df["p_value"][0] == pytest.approx(p_planted, rel=1e-10)
    p_uniform = sum(math.comb(10, x) * math.comb(10, 10 - x) for x in range(5, 11))
    p_uniform /= math.comb(20, 10)
    assert df["p_value"][1] == pytest.approx(p_uniform, rel=1e-10)
    assert df["p_value"][2] == pytest.approx(1.0)
    for row in df.itertuples():
        want = stats.hypergeom.sf(row.count - 1, 20, row.pattern_size, row.cluster_size)
        assert row.p_value == pytest.approx(want, rel=1e-12)
    _, q, _, _ = multipletests(df["p_value"], method="fdr_bh")
    np.testing.assert_allclose(df["q_value"], q, rtol=1e-12)
    assert df["q_value"][0] == pytest.approx(4 * p_planted, rel=1e-10)  # rank 1 of 4
    assert df["enriched"].tolist() == [True, False, False, False]


# ----------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([CODE, PROSE], ["code"]), {}, ValueError, "kinds must have one entry"),
        (([CODE], ["python"]), {}, ValueError, r"kinds\[0\]"),
        (([CODE, ""], ["code", "prose"]), {}, ValueError, r"windows\[1\]"),
        (([CODE, "a"], ["code", "prose"]), {}, ValueError, r"windows\[1\] has 1 token"),
        (([], []), {}, ValueError, "windows must hold"),
        ((CODE, ["code"]), {}, TypeError, "windows must be"),
        (([["a", 1]], ["code"]), {}, TypeError, r"windows\[0\]\[1\]"),
        (([CODE], "code"), {}, TypeError, "kinds"),
        (([CODE], ["code"]), {"induction_k": 0}, ValueError, "induction_k"),
        (([CODE], ["code"]), {"first_position": -1}, ValueError, "first_position"),
    ],
)
def test_assign_patterns_rejects_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        assign_patterns(*args, **kwargs)


def test_other_functions_reject_bad_inputs():
    runs = synthetic_runs(components=1)
    with pytest.raises(TypeError, match=r"patterns\['a'\]"):
        pattern_matrix(runs, {"a": np.arange(3)})
    with pytest.raises(ValueError, match="zero members"):
        pattern_matrix(runs, {"a": np.zeros(12, bool)})
    with pytest.raises(TypeError, match="groups"):
        pattern_matrix(runs, {"a": np.ones(12, bool)}, groups="dataset")
    with pytest.raises(ValueError, match=r"patterns\['b'\]"):
        pattern_matrix(runs, {"a": np.ones(12, bool), "b": np.ones(5, bool)})
    with pytest.raises(ValueError, match="labels"):
        pattern_enrichment(np.zeros(5), {"a": np.ones(6, bool)})
    with pytest.raises(ValueError, match="fdr"):
        pattern_enrichment(np.zeros(6), {"a": np.ones(6, bool)}, fdr=1.5)
    with pytest.raises(ValueError, match="source lacks"):
        patterns_from_coords({"sequence": [0]}, [CODE])

"""Token patterns of text and code, their susceptibilities, and cluster enrichment.

A *pattern* is a set of probe tokens picked out by an exact rule on the token's text and
its neighbours in its window. Patterns overlap (a token can be in several, or in none).
:func:`assign_patterns` returns one boolean mask per pattern over the probe tokens, in
the order of :data:`PATTERNS`; :func:`pattern_matrix` gives their susceptibilities
(a pattern's χ is the mean of its tokens' χ; rename its ``pattern`` dimension to
``probe`` to standardize it with :func:`bayes_susc.estimation.response_matrix.standardize`,
the papers' column z-scoring and row centring, or to run ``pca`` and ``cluster``), and
:func:`pattern_enrichment` says which patterns are over-represented in which cluster of
probe tokens.

Rules
-----
A window is a sequence of token strings; ``T`` is their concatenation. A token occupies
``T[a:b]``; its *previous character* is ``T[a - 1]`` and its *next character* is
``T[b]``. Beyond the ends of the window the text is unknown (windows are cut from a
corpus at random offsets), so a rule that needs a character outside the window does
not hold. Character classes:

* *word character*: a letter (``str.isalpha``), an ASCII digit ``0-9`` or ``_``;
* *blank*: a space or a tab;
* *punctuation character*: Unicode category P* or S* (every printable ASCII
  non-alphanumeric except the space), except ``_``, the brackets ``()[]{}``, the quote
  characters below, and U+FFFD (a lone non-ASCII byte decodes to it: not a symbol);
* *quote character*: ``'``, ``"``, the backtick, and ``‘ ’ “ ”``.

Rules for a token ``s`` (of one character for byte-level models; a longer token is in a
character-class pattern when *all* its characters are in the class):

``whitespace``
    every character is whitespace (``str.isspace``), none is ``\\n``, and the token is
    not ``indentation``; a run of blanks that reaches back to the window's start
    without a newline is in neither pattern (its line start is not in the window).
``newline``
    the token contains ``\\n``.
``indentation``
    every character is a blank, and the characters before it back to the nearest
    ``\\n`` in the window are all blanks (spaces/tabs at the start of a line).
``word_start``
    ``s[0]`` is a letter or ``_`` and the previous character is not a word character.
``word_interior``
    every character is a word character, and so are the previous and the next one.
``word_end``
    ``s[-1]`` is a word character and the next character is not one (the label
    describes the token in its text, so it looks ahead). A one-letter word is both
    ``word_start`` and ``word_end``; a number's last digit is ``word_end``.
``digit``
    every character is an ASCII digit.
``punctuation``
    every character is a punctuation character.
``bracket_open`` / ``bracket_close``
    every character is in ``([{`` / ``)]}``.
``quote``
    every character is a quote character (apostrophes included: a byte cannot tell).
``inside_string`` (code windows only)
    every character lies strictly between an opening ``'`` or ``"`` and the next
    unescaped (no ``\\`` before it) same quote on the same line. Each line of the window
    is scanned left to right from outside any string; a quote with no match on its
    line opens nothing; ``#`` outside a string ends the scan of the line. (A
    triple-quoted ``\"\"\"doc\"\"\"`` on one line reads as ``""`` ``"doc"`` ``""``:
    ``doc`` is inside; lines *within* a multi-line string are not detected.)
``inside_comment`` (code windows only)
    every character lies after a ``#`` found by that scan (outside a string), up to
    and excluding the ``\\n`` ending its line; the ``#`` itself is not inside.
``induction_continuation``
    token ``t_i`` (``i >= k``) whose preceding k tokens ``t_{i-k} .. t_{i-1}`` occurred
    earlier in the window, at ``t_{j-k} .. t_{j-1}`` with ``j < i``, followed there by
    ``t_j == t_i``: copying from the earlier occurrence predicts it (the prediction an
    induction head makes). Overlapping occurrences count.
``repeat_first``
    token ``t_j`` right after the *first* occurrence ``t_{j-k} .. t_{j-1}`` of a k-gram
    that occurs again, starting later, in the window (the "first copy" an induction
    head later copies from).

Tokens are compared as strings, k = ``induction_k`` (default 2). ``kinds[w]`` is
``'code'`` or ``'prose'``; the string and comment rules apply only to code windows.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats
from statsmodels.stats.multitest import multipletests

from bayes_susc.estimation.response_matrix import (
    DEFAULT_FDR,
    DEFAULT_MAX_RHAT,
    DEFAULT_MIN_DRAWS,
    DEFAULT_MIN_ESS,
    assign_status,
    check_thresholds,
)
from bayes_susc.validation import check_fraction, check_int

__all__ = [
    "KINDS",
    "PATTERNS",
    "PATTERN_DESCRIPTIONS",
    "assign_patterns",
    "pattern_enrichment",
    "pattern_matrix",
    "patterns_from_coords",
]

#: Window kinds accepted by :func:`assign_patterns`.
KINDS = ("code", "prose")

#: Pattern name -> one-line rule (the module docstring states each exactly).
PATTERN_DESCRIPTIONS: dict[str, str] = {
    "whitespace": "whitespace that is not a newline and not indentation",
    "newline": "a newline character",
    "indentation": "spaces/tabs at the start of a line",
    "word_start": "a letter/underscore after a non-word character",
    "word_interior": "a word character between two word characters",
    "word_end": "a word character before a non-word character",
    "digit": "an ASCII digit",
    "punctuation": "a punctuation or symbol character (not a bracket or quote)",
    "bracket_open": "one of ( [ {",
    "bracket_close": "one of ) ] }",
    "quote": "a quote character ' \" ` (or a typographic quote)",
    "inside_string": "inside a string literal on one line (code only)",
    "inside_comment": "after # up to the end of the line (code only)",
    "induction_continuation": "predicted by copying: its preceding k tokens occurred "
    "earlier in the window followed by it",
    "repeat_first": "the token after the first occurrence of a k-gram that recurs later",
}
#: Pattern names in the order :func:`assign_patterns` returns them.
PATTERNS: tuple[str, ...] = tuple(PATTERN_DESCRIPTIONS)

_DIGITS = frozenset("0123456789")
_BLANKS = frozenset(" \t")
_OPEN = frozenset("([{")
_CLOSE = frozenset(")]}")
_QUOTES = frozenset("'\"`\u2018\u2019\u201c\u201d")
_STRING_QUOTES = frozenset("'\"")
_FLAGS = ("unstable", "low_acceptance", "stuck", "loss_anchor")


# --------------------------------------------------------------------------------------
# Pattern assignment
# --------------------------------------------------------------------------------------


def _is_word(c: str) -> bool:
    return c == "_" or c in _DIGITS or c.isalpha()


def _is_punct(c: str) -> bool:
    if c == "_" or c == "\ufffd" or c in _OPEN or c in _CLOSE or c in _QUOTES:
        return False
    return unicodedata.category(c)[0] in "PS"


def _scan_code(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-character (inside string, inside comment) of a code window (rules above)."""
    n = len(text)
    in_str = np.zeros(n, dtype=bool)
    in_com = np.zeros(n, dtype=bool)
    start = 0
    while start < n:
        end = text.find("\n", start)
        end = n if end < 0 else end
        j = start
        while j < end:
            c = text[j]
            if c == "#":
                in_com[j + 1 : end] = True
                break
            if c in _STRING_QUOTES:
                m = j + 1
                while m < end and text[m] != c:
                    m += 2 if text[m] == "\\" else 1
                if m < end:
                    in_str[j + 1 : m] = True
                    j = m + 1
                    continue
            j += 1
        start = end + 1
    return in_str, in_com


def _window_patterns(tokens: Sequence[str], kind: str, k: int) -> dict[str, np.ndarray]:
    """Masks over *every* position of one window (position 0 included)."""
    n = len(tokens)
    text = "".join(tokens)
    size = len(text)
    bounds = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(int)
    if kind == "code":
        in_str, in_com = _scan_code(text)
    else:
        in_str = in_com = np.zeros(size, dtype=bool)
    out = {name: np.zeros(n, dtype=bool) for name in PATTERNS}
    for i, s in enumerate(tokens):
        a, b = int(bounds[i]), int(bounds[i + 1])
        if a == b:
            continue
        prev = text[a - 1] if a > 0 else None
        nxt = text[b] if b < size else None
        if "\n" in s:
            out["newline"][i] = True
        elif all(c in _BLANKS for c in s):
            j = a - 1
            while j >= 0 and text[j] in _BLANKS:
                j -= 1
            if j >= 0:  # j < 0: the line start lies before the window, unknown
                out["indentation" if text[j] == "\n" else "whitespace"][i] = True
        elif all(c.isspace() for c in s):
            out["whitespace"][i] = True
        all_word = all(_is_word(c) for c in s)
        out["word_start"][i] = (
            (s[0] == "_" or s[0].isalpha()) and prev is not None and not _is_word(prev)
        )
        out["word_interior"][i] = (
            all_word and prev is not None and _is_word(prev) and nxt is not None and _is_word(nxt)
        )
        out["word_end"][i] = _is_word(s[-1]) and nxt is not None and not _is_word(nxt)
        out["digit"][i] = all(c in _DIGITS for c in s)
        out["punctuation"][i] = all(_is_punct(c) for c in s)
        out["bracket_open"][i] = all(c in _OPEN for c in s)
        out["bracket_close"][i] = all(c in _CLOSE for c in s)
        out["quote"][i] = all(c in _QUOTES for c in s)
        out["inside_string"][i] = bool(in_str[a:b].all())
        out["inside_comment"][i] = bool(in_com[a:b].all())

    follows: dict[tuple[str, ...], set[str]] = {}
    starts: dict[tuple[str, ...], list[int]] = {}
    for i in range(n - k + 1):
        starts.setdefault(tuple(tokens[i : i + k]), []).append(i)
    for i in range(k, n):
        key = tuple(tokens[i - k : i])
        seen = follows.setdefault(key, set())
        out["induction_continuation"][i] = tokens[i] in seen
        seen.add(tokens[i])
    for at in starts.values():
        if len(at) >= 2 and at[0] + k < n:
            out["repeat_first"][at[0] + k] = True
    return out


def _check_windows(windows: Any, kinds: Any) -> tuple[list[list[str]], list[str]]:
    if isinstance(windows, str) or not isinstance(windows, Sequence | np.ndarray):
        raise TypeError(
            f"windows must be a sequence of windows (each a sequence of token strings), got "
            f"{type(windows).__name__}"
        )
    if len(windows) == 0:
        raise ValueError("windows must hold at least one window, got an empty sequence")
    if isinstance(kinds, str) or not isinstance(kinds, Sequence | np.ndarray):
        raise TypeError(f"kinds must be a sequence of 'code'/'prose', got {type(kinds).__name__}")
    if len(kinds) != len(windows):
        raise ValueError(f"kinds must have one entry per window ({len(windows)}), got {len(kinds)}")
    out_w, out_k = [], []
    for w, (window, kind) in enumerate(zip(windows, kinds)):
        if str(kind) not in KINDS:
            raise ValueError(f"kinds[{w}] must be 'code' or 'prose', got {kind!r}")
        if isinstance(window, str):
            window = list(window)  # a string: one token per character
        elif not isinstance(window, Sequence | np.ndarray):
            raise TypeError(
                f"windows[{w}] must be a sequence of token strings, got {type(window).__name__}"
            )
        tokens = list(window)
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TypeError(
                    f"windows[{w}][{i}] must be a str (a decoded token), got {type(t).__name__}"
                )
        out_w.append(tokens)
        out_k.append(str(kind))
    return out_w, out_k


def assign_patterns(
    windows: Sequence[Sequence[str]],
    kinds: Sequence[str],
    *,
    first_position: int = 1,
    induction_k: int = 2,
) -> dict[str, np.ndarray]:
    """Boolean pattern masks over the probe tokens of ``windows`` (rules: module docstring).

    Args:
        windows: the probe windows, each a sequence of token strings (a ``str`` is read
            as one token per character). For byte tokens use e.g.
            ``[bayes_susc.demo.corpus.decode([t]) for t in row]`` per row.
        kinds: ``'code'`` or ``'prose'`` per window.
        first_position: the first probe position of each window: probes are positions
            ``first_position .. len(window) − 1`` (the demo's: 1, since the token at
            position p is predicted from positions < p). Earlier tokens are context.
        induction_k: k of ``induction_continuation`` and ``repeat_first``, >= 1.

    Returns:
        Pattern name -> bool array (num_probe,), in the order of :data:`PATTERNS`, every
        pattern present (possibly all False); probes flattened window-major.

    Raises:
        TypeError: ``windows``, a window, a token or ``kinds`` has the wrong type.
        ValueError: no windows, ``kinds`` of another length or with an unknown kind, a
            window with no probe position (including an empty window), or
            ``first_position`` < 0 / ``induction_k`` < 1.
    """
    first_position = check_int("first_position", first_position, minimum=0)
    induction_k = check_int("induction_k", induction_k, minimum=1)
    wins, knds = _check_windows(windows, kinds)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in PATTERNS}
    for w, (tokens, kind) in enumerate(zip(wins, knds)):
        if len(tokens) <= first_position:
            raise ValueError(
                f"windows[{w}] has {len(tokens)} token(s); with first_position="
                f"{first_position} it needs at least {first_position + 1} (an empty window "
                "has no probe tokens)"
            )
        masks = _window_patterns(tokens, kind, induction_k)
        for name in PATTERNS:
            parts[name].append(masks[name][first_position:])
    return {name: np.concatenate(parts[name]) for name in PATTERNS}


def patterns_from_coords(
    source: xr.Dataset | xr.DataArray | Mapping[str, Any],
    windows: Sequence[Sequence[str]],
    *,
    induction_k: int = 2,
) -> dict[str, np.ndarray]:
    """Pattern masks aligned with the probe items of a response matrix (or probe coords).

    Args:
        source: a response matrix (or any Dataset/DataArray with a ``probe`` dimension),
            or a mapping of probe coordinates; it needs ``sequence`` (window index into
            ``windows``), ``position`` (token index in the window) and ``dataset``
            (``'code'``/``'prose'``, constant within a sequence). When it has ``token``
            (the demo's decoded byte), each must equal ``windows[sequence][position]``.
        windows: the full probe windows (position 0 included), as for
            :func:`assign_patterns`.
        induction_k: as for :func:`assign_patterns`.

    Returns:
        Pattern name -> bool array over the probe items in ``source``'s order.

    Raises:
        ValueError: a coordinate is missing, of the wrong length, inconsistent, or points
            outside ``windows``.
    """
    induction_k = check_int("induction_k", induction_k, minimum=1)
    if isinstance(source, xr.Dataset | xr.DataArray):
        coords = {
            name: np.asarray(c.values) for name, c in source.coords.items() if c.dims == ("probe",)
        }
    elif isinstance(source, Mapping):
        coords = {name: np.asarray(v) for name, v in source.items()}
    else:
        raise TypeError(
            "source must be a response matrix (xarray) or a mapping of probe coordinates, got "
            f"{type(source).__name__}"
        )
    missing = [c for c in ("sequence", "position", "dataset") if c not in coords]
    if missing:
        raise ValueError(f"source lacks probe coordinate(s) {missing}")
    seq, pos, kind = coords["sequence"], coords["position"], coords["dataset"]
    n = seq.shape[0]
    for name in ("position", "dataset") + (("token",) if "token" in coords else ()):
        if coords[name].shape != (n,):
            raise ValueError(
                f"source: coordinate {name!r} has shape {coords[name].shape}, expected ({n},)"
            )
    if seq.dtype.kind not in "iu" or pos.dtype.kind not in "iu":
        raise ValueError("source: 'sequence' and 'position' must be integer coordinates")
    kinds: dict[int, str] = {}
    for s, k in zip(seq.tolist(), kind.tolist()):
        if kinds.setdefault(s, str(k)) != str(k):
            raise ValueError(f"source: sequence {s} has more than one 'dataset' value")
    if isinstance(windows, str) or not isinstance(windows, Sequence | np.ndarray):
        raise TypeError(f"windows must be a sequence of windows, got {type(windows).__name__}")
    used = sorted(kinds)
    if used and (used[0] < 0 or used[-1] >= len(windows)):
        raise ValueError(
            f"source: 'sequence' values must index windows (0..{len(windows) - 1}), got "
            f"{used[0]}..{used[-1]}"
        )
    wins, knds = _check_windows([windows[s] for s in used], [kinds[s] for s in used])
    by_seq = dict(zip(used, wins))
    per_window = {s: _window_patterns(by_seq[s], k, induction_k) for s, k in zip(used, knds)}
    out = {name: np.zeros(n, dtype=bool) for name in PATTERNS}
    for i, (s, p) in enumerate(zip(seq.tolist(), pos.tolist())):
        if not 0 <= p < len(by_seq[s]):
            raise ValueError(
                f"source: probe {i} has position {p}, outside window {s} ({len(by_seq[s])} tokens)"
            )
        if "token" in coords and str(coords["token"][i]) != by_seq[s][p]:
            raise ValueError(
                f"source: probe {i} has token {coords['token'][i]!r} but windows[{s}][{p}] is "
                f"{by_seq[s][p]!r}; the windows do not match the probes"
            )
        for name in PATTERNS:
            out[name][i] = per_window[s][name][p]
    return out


# --------------------------------------------------------------------------------------
# Pattern susceptibilities
# --------------------------------------------------------------------------------------


def _check_masks(patterns: Any, name: str = "patterns") -> dict[str, np.ndarray]:
    if not isinstance(patterns, Mapping) or not patterns:
        raise ValueError(f"{name} must be a non-empty mapping of pattern name -> boolean mask")
    masks: dict[str, np.ndarray] = {}
    size = None
    for key, mask in patterns.items():
        arr = np.asarray(mask.values if isinstance(mask, xr.DataArray) else mask)
        if arr.dtype != bool or arr.ndim != 1:
            raise TypeError(
                f"{name}[{key!r}] must be a 1-D boolean mask over the probe items, got dtype "
                f"{arr.dtype} and shape {arr.shape}"
            )
        if size is None:
            size = arr.shape[0]
        elif arr.shape[0] != size:
            raise ValueError(
                f"{name}[{key!r}] has {arr.shape[0]} entries, the first mask {size}; every "
                "mask must cover the same probe items"
            )
        masks[str(key)] = arr
    return masks


def pattern_matrix(
    runs: Mapping[str, Any],
    patterns: Mapping[str, np.ndarray],
    *,
    min_ess: float = DEFAULT_MIN_ESS,
    max_rhat: float = DEFAULT_MAX_RHAT,
    fdr: float = DEFAULT_FDR,
    min_draws: int = DEFAULT_MIN_DRAWS,
    component_flags: xr.Dataset | None = None,
    **estimate_kwargs: Any,
) -> xr.Dataset:
    """Susceptibilities of token patterns over (pattern, component), with statuses.

    A pattern's χ is the mean of its tokens' χ: the per-token loss differences are
    averaged over the pattern's tokens before the covariance
    (:func:`~bayes_susc.estimation.susceptibility.estimate_many` with ``groups``), so
    intervals, R-hat and ESS are those of the pattern's own product series.

    Args:
        runs: component name -> that component's draws, as for ``estimate_many``.
        patterns: pattern name -> bool mask over the runs' probe items (num_probe,), e.g.
            from :func:`assign_patterns` or :func:`patterns_from_coords`. Patterns with
            no member are dropped and listed in ``attrs["dropped_patterns"]``.
        min_ess, max_rhat, fdr, min_draws: thresholds of
            :func:`~bayes_susc.estimation.response_matrix.assign_status`. The
            Benjamini–Hochberg family is this matrix's (pattern, component) entries,
            separate from the token matrix's.
        component_flags: optional Dataset (e.g. the token response matrix) whose
            per-component flags ``unstable``, ``low_acceptance``, ``stuck``,
            ``loss_anchor`` (dims ``("component",)``) are copied so that the statuses
            use them as for tokens. (Per-entry ``bias_exceeds_interval`` is per token and
            is not carried over.)
        **estimate_kwargs: passed to ``estimate_many`` (``method``, ``confidence``,
            ``seed``, ...); not ``groups``.

    Returns:
        Dataset over (``pattern``, ``component``) with ``chi`` (loss units², as for
        tokens), ``se``, ``ci_low``, ``ci_high``, ``p_value``, ``rhat``, ``ess_bulk``,
        ``ess_tail``, ``ess``, ``mcse``, ``status``, ``q_value``, ``reliable``, per
        component ``num_diverged_chains`` and ``num_draws``; coordinates ``num_tokens``
        (members per pattern) and ``description`` over ``pattern``. For
        :mod:`~bayes_susc.estimation.response_matrix` analyses use
        ``ds.rename(pattern="probe")``.

    Raises:
        TypeError: a mask is not a 1-D boolean array, or ``groups`` is passed.
        ValueError: no patterns, masks of different lengths (or not matching the runs'
            probe items), every pattern empty, a threshold out of range, or any
            ``estimate_many`` error.
    """
    from bayes_susc.estimation.susceptibility import estimate_many

    min_ess, max_rhat, fdr, min_draws = check_thresholds(min_ess, max_rhat, fdr, min_draws)
    if "groups" in estimate_kwargs:
        raise TypeError("pattern_matrix sets groups from patterns; do not pass groups")
    masks = _check_masks(patterns)
    kept = {k: m for k, m in masks.items() if m.any()}
    dropped = [k for k, m in masks.items() if not m.any()]
    if not kept:
        raise ValueError(f"patterns: every pattern has zero members ({sorted(masks)})")
    ds = estimate_many(runs, groups=kept, **estimate_kwargs)
    if component_flags is not None:
        ds = _copy_flags(ds, component_flags)
    ds = assign_status(ds, min_ess=min_ess, max_rhat=max_rhat, fdr=fdr, min_draws=min_draws)
    ds = ds.drop_vars("group", errors="ignore").rename({"probe": "pattern"})
    ds = ds.rename({"num_items": "num_tokens"})
    ds["num_tokens"].attrs["description"] = "probe tokens in the pattern"
    names = [str(v) for v in ds["pattern"].values]
    ds = ds.assign_coords(
        description=("pattern", np.array([PATTERN_DESCRIPTIONS.get(n, "") for n in names]))
    )
    ds.attrs["dropped_patterns"] = " ".join(dropped)
    ds.attrs["note"] = (
        f"patterns with zero probe tokens were dropped: {', '.join(dropped)}"
        if dropped
        else "no pattern was dropped"
    )
    return ds


def _copy_flags(ds: xr.Dataset, flags: Any) -> xr.Dataset:
    if not isinstance(flags, xr.Dataset):
        raise TypeError(f"component_flags must be an xarray.Dataset, got {type(flags).__name__}")
    ds = ds.copy()
    for name in _FLAGS:
        if name not in flags:
            continue
        var = flags[name]
        if var.dims != ("component",):
            raise ValueError(
                f"component_flags[{name!r}] must have dims ('component',), got {var.dims}"
            )
        have = [str(c) for c in var["component"].values]
        want = [str(c) for c in ds["component"].values]
        missing = sorted(set(want) - set(have))
        if missing:
            raise ValueError(f"component_flags[{name!r}] lacks components {missing}")
        values = np.asarray(var.values)[[have.index(c) for c in want]]
        ds[name] = ("component", values.astype(bool))
    return ds


# --------------------------------------------------------------------------------------
# Standardization
# --------------------------------------------------------------------------------------


def pattern_enrichment(
    labels: Any,
    patterns: Mapping[str, np.ndarray],
    *,
    fdr: float = 0.05,
    ignore: Any = -1,
) -> pd.DataFrame:
    """Over-representation of each pattern in each cluster (hypergeometric test, BH).

    The population is the N probe tokens whose label is not ``ignore`` (``-1`` marks
    probes :func:`~bayes_susc.estimation.response_matrix.cluster` left out). For cluster
    c of size n and pattern P with K members in the population, k = members in c:

    * ``expected`` = n·K/N, ``fold_enrichment`` = k / expected (NaN when expected = 0);
    * ``p_value`` = P(X >= k) for X ~ Hypergeom(N, K, n): ``scipy.stats.hypergeom.sf(k −
      1, N, K, n)``, one-sided for over-representation;
    * ``q_value``: Benjamini–Hochberg (``multipletests(method="fdr_bh")``) over all
      (cluster, pattern) pairs of the table; ``enriched`` = q <= ``fdr``.

    Patterns with no member in the population are left out of the table (their test
    cannot reject) and named in ``attrs["dropped_patterns"]``.

    Args:
        labels: cluster id per probe token (num_probe,): array or DataArray.
        patterns: pattern name -> bool mask (num_probe,).
        fdr: false-discovery rate, in (0, 1).
        ignore: label value excluded from the population (None: exclude nothing).

    Returns:
        DataFrame, one row per (cluster, pattern), clusters sorted, patterns in the
        mapping's order, columns ``cluster``, ``pattern``, ``cluster_size`` (n),
        ``pattern_size`` (K), ``count`` (k), ``expected``, ``fold_enrichment``,
        ``p_value``, ``q_value``, ``enriched``; ``attrs`` holds ``N``, ``fdr`` and
        ``dropped_patterns``.

    Raises:
        ValueError: labels not 1-D or of another length than the masks, no probe left,
            ``fdr`` out of range. TypeError: a mask is not boolean.
    """
    fdr = check_fraction("fdr", fdr, open_low=True)
    lab = np.asarray(labels.values if isinstance(labels, xr.DataArray) else labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D (one cluster id per probe), got shape {lab.shape}")
    masks = _check_masks(patterns)
    size = next(iter(masks.values())).shape[0]
    if lab.shape[0] != size:
        raise ValueError(
            f"labels has {lab.shape[0]} entries but the pattern masks have {size}; they must "
            "cover the same probe items"
        )
    use = np.ones(size, dtype=bool) if ignore is None else ~(lab == ignore)
    total = int(use.sum())
    if total == 0:
        raise ValueError(f"labels: every probe has the ignored label {ignore!r}")
    lab = lab[use]
    clusters = np.unique(lab)
    kept = {k: m[use] for k, m in masks.items() if m[use].any()}
    dropped = [k for k in masks if k not in kept]
    rows = []
    for c in clusters:
        member = lab == c
        n = int(member.sum())
        for name, m in kept.items():
            big_k = int(m.sum())
            k = int((m & member).sum())
            expected = n * big_k / total
            rows.append(
                {
                    "cluster": c.item() if isinstance(c, np.generic) else c,
                    "pattern": name,
                    "cluster_size": n,
                    "pattern_size": big_k,
                    "count": k,
                    "expected": expected,
                    "fold_enrichment": k / expected if expected > 0 else np.nan,
                    "p_value": float(stats.hypergeom.sf(k - 1, total, big_k, n)),
                }
            )
    columns = [
        "cluster",
        "pattern",
        "cluster_size",
        "pattern_size",
        "count",
        "expected",
        "fold_enrichment",
        "p_value",
    ]
    df = pd.DataFrame.from_records(rows, columns=columns)
    if len(df):
        p = np.clip(df["p_value"].to_numpy(), 0.0, 1.0)  # sf can round a hair above 1
        _, q, _, _ = multipletests(p, alpha=fdr, method="fdr_bh")
        df["q_value"] = q
        df["enriched"] = q <= fdr
    else:
        df["q_value"] = pd.Series(dtype=float)
        df["enriched"] = pd.Series(dtype=bool)
    df.attrs.update({"N": total, "fdr": fdr, "dropped_patterns": dropped})
    return df

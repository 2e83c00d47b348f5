"""Byte-level corpora built only from files every Python install has (nothing downloaded).

- ``'code'``: the ``.py`` sources of the standard library (``sysconfig`` ``stdlib`` path),
  sorted by relative path, skipping test directories and site-packages.
- ``'prose'``: the English help texts of ``pydoc_data.topics.topics``, sorted by key,
  keeping only prose paragraphs: indented code examples, grammar rules (``::=``), doctest
  blocks and heading underlines are dropped (a paragraph is kept when it has no ``>>>`` /
  ``::=`` and at least 93% of its characters are letters, spaces or ``,.;'-`` / newline).

Each corpus is one deterministic byte string (documents joined by blank lines); sequences
are windows of it drawn with a seeded numpy Generator, so the same seed on the same Python
gives an identical tensor.
"""

from __future__ import annotations

import functools
import os
import re
import sysconfig
import textwrap
from typing import Literal

import numpy as np
import torch

__all__ = ["Kind", "corpus_bytes", "decode", "load_corpus", "mixed_corpus"]

Kind = Literal["code", "prose"]

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SEP = b"\n\n"
_PROSE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;\n'\u2019-")


def _is_prose(par: str) -> bool:
    if not par.strip() or ">>>" in par or "::=" in par:
        return False
    return sum(ch in _PROSE_CHARS for ch in par) >= 0.93 * len(par)


def _prose_text(text: str) -> str:
    pars = (textwrap.dedent(p).strip("\n") for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in pars if _is_prose(p))


@functools.cache
def corpus_bytes(kind: Kind) -> np.ndarray:
    """The whole corpus of ``kind`` as a read-only uint8 array (n_bytes,)."""
    if kind == "code":
        root = sysconfig.get_paths()["stdlib"]
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            rel = os.path.relpath(dirpath, root)
            paths += [
                os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")
            ]
        paths.sort(key=lambda p: p.replace(os.sep, "/"))
        docs = []
        for rel in paths:
            with open(os.path.join(root, rel), "rb") as fh:
                docs.append(fh.read())
    elif kind == "prose":
        from pydoc_data.topics import topics

        texts = (_prose_text(topics[k]) for k in sorted(topics))
        docs = [t.encode("utf-8") for t in texts if t]
    else:
        raise ValueError(f"kind must be 'code' or 'prose', got {kind!r}")
    arr = np.frombuffer(_SEP.join(docs), dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def _windows(data: np.ndarray, n: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    if seq_len > data.size:
        raise ValueError(f"seq_len={seq_len} exceeds corpus size {data.size}")
    starts = rng.integers(0, data.size - seq_len + 1, size=n)
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(data[idx].astype(np.int64))


def load_corpus(kind: Kind, n_sequences: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sample ``n_sequences`` byte windows of length ``seq_len`` from corpus ``kind``.

    Returns a LongTensor (n_sequences, seq_len) with values in 0..255.
    """
    return _windows(corpus_bytes(kind), n_sequences, seq_len, np.random.default_rng(seed))


def mixed_corpus(
    n_sequences: int, seq_len: int, seed: int, code_fraction: float = 0.5
) -> tuple[torch.Tensor, np.ndarray]:
    """A shuffled mix of code and prose windows.

    Returns ``(tokens, kinds)``: LongTensor (n_sequences, seq_len) and a numpy array of
    str (n_sequences,) with entries ``'code'`` / ``'prose'`` labelling each row.
    """
    if not 0.0 <= code_fraction <= 1.0:
        raise ValueError("code_fraction must be in [0, 1]")
    n_code = int(round(n_sequences * code_fraction))
    s_code, s_prose, s_perm = np.random.SeedSequence(seed).spawn(3)
    code = _windows(corpus_bytes("code"), n_code, seq_len, np.random.default_rng(s_code))
    prose = _windows(
        corpus_bytes("prose"), n_sequences - n_code, seq_len, np.random.default_rng(s_prose)
    )
    perm = np.random.default_rng(s_perm).permutation(n_sequences)
    tokens = torch.cat([code, prose])[torch.from_numpy(perm)]
    kinds = np.array(["code"] * n_code + ["prose"] * (n_sequences - n_code))[perm]
    return tokens, kinds


def decode(tokens: torch.Tensor | np.ndarray | list[int]) -> str:
    """Byte tokens (pos,) -> text (utf-8, invalid bytes replaced).

    A 2-D input (batch, pos) is decoded row by row, rows joined by newlines.
    """
    arr = np.asarray(tokens.detach().cpu() if isinstance(tokens, torch.Tensor) else tokens)
    if arr.ndim == 2:
        return "\n".join(decode(row) for row in arr)
    return bytes(arr.astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def stdlib_mixed_data(
    *,
    n_train: int,
    n_eval: int,
    n_probe: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    code_fraction: float,
) -> dict:
    """The data of a run config's ``source = "stdlib_mixed"``: byte sequences of this corpus.

    Returns ``train_data`` (a list of LongTensor batches (batch_size, seq_len)),
    ``eval_data`` (n_eval, seq_len), ``probe_data`` (n_probe, seq_len) and
    ``probe_coords`` naming each probe token (n_probe · (seq_len − 1) items: dataset,
    sequence, position, token). Train, eval and probe sequences use seeds ``seed``,
    ``seed + 1`` and ``seed + 2``.
    """
    train, _ = mixed_corpus(n_train, seq_len, seed=seed, code_fraction=code_fraction)
    eval_tokens, _ = mixed_corpus(n_eval, seq_len, seed=seed + 1, code_fraction=code_fraction)
    probe, kinds = mixed_corpus(n_probe, seq_len, seed=seed + 2, code_fraction=code_fraction)
    return {
        "train_data": list(train.split(batch_size)),
        "eval_data": eval_tokens,
        "probe_data": probe,
        "probe_coords": {
            "dataset": np.repeat(kinds, seq_len - 1),
            "sequence": np.repeat(np.arange(n_probe), seq_len - 1),
            "position": np.tile(np.arange(1, seq_len), n_probe),
            "token": [decode([int(t)]) for row in probe for t in row[1:]],
        },
    }

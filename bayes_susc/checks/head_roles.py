"""Ground-truth roles of attention heads from standard attention-pattern scores.

Each score is a mean attention probability, so it lies in [0, 1]:

``previous_token``
    attention from position q to q − 1 (mean over q ≥ 1);
``self``
    attention from q to itself (mean over q ≥ 1: at q = 0 it is 1 by causality);
``first_token``
    attention from q to position 0, the BOS position in models that have one
    (mean over q ≥ 1);
``induction``
    on sequences made of a random block of L tokens repeated twice, attention from a
    token of the second copy (q = L … 2L − 1) to the token right *after* its earlier
    occurrence, key position q − L + 1 (Olsson et al. 2022, "In-context learning and
    induction heads");
``duplicate_token``
    on the same sequences, attention from q to the earlier occurrence of its token,
    key position q − L.

The block tokens are drawn without replacement (when the vocabulary allows it), so
every token of the second copy has exactly one earlier occurrence. The three
position scores use ``tokens`` when given (e.g. natural text), else the repeated random
sequences.

The pattern functions (:func:`previous_token_score`, ...) take any attention tensor
``(..., batch, q, k)`` and can be used with any model; :func:`head_role_scores` runs
them on a model that reports its own patterns (``model.attention_patterns(tokens)``, as
the demo's :class:`~bayes_susc.demo.model.AttnOnlyTransformer` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from bayes_susc.validation import check_int

__all__ = [
    "ROLE_SCORES",
    "duplicate_token_score",
    "first_token_score",
    "head_role_scores",
    "induction_score",
    "previous_token_score",
    "repeated_random_tokens",
    "self_score",
]

#: The scores :func:`head_role_scores` returns, in order.
ROLE_SCORES = ("previous_token", "induction", "duplicate_token", "first_token", "self")


def _check_pattern(patterns: Tensor, min_len: int = 2) -> int:
    if patterns.dim() < 3 or patterns.shape[-1] != patterns.shape[-2]:
        raise ValueError(
            f"patterns must have shape (..., batch, q, k) with q == k, got {tuple(patterns.shape)}"
        )
    n = patterns.shape[-1]
    if n < min_len:
        raise ValueError(f"patterns need at least {min_len} positions, got {n}")
    return n


def _diag_mean(patterns: Tensor, offset: int, q_from: int) -> Tensor:
    """Mean over batch and q ≥ q_from of patterns[..., q, q + offset] -> shape (...)."""
    diag = torch.diagonal(patterns, offset=offset, dim1=-2, dim2=-1)  # (..., batch, n - |offset|)
    # diagonal(offset < 0) starts at q = -offset; keep q >= q_from.
    start = q_from - max(-offset, 0)
    return diag[..., start:].mean(dim=(-2, -1))


def previous_token_score(patterns: Tensor) -> Tensor:
    """Mean attention from q to q − 1 over q ≥ 1 and the batch: (..., batch, q, k) -> (...)."""
    _check_pattern(patterns)
    return _diag_mean(patterns, -1, 1)


def self_score(patterns: Tensor) -> Tensor:
    """Mean attention from q to q over q ≥ 1 and the batch: (..., batch, q, k) -> (...)."""
    _check_pattern(patterns)
    return _diag_mean(patterns, 0, 1)


def first_token_score(patterns: Tensor) -> Tensor:
    """Mean attention from q to position 0 over q ≥ 1 and the batch -> (...)."""
    _check_pattern(patterns)
    return patterns[..., 1:, 0].mean(dim=(-2, -1))


def _check_repeated(patterns: Tensor, block_len: int) -> None:
    n = _check_pattern(patterns)
    block_len = check_int("block_len", block_len, minimum=1)
    if n != 2 * block_len:
        raise ValueError(
            f"patterns of a twice-repeated block of {block_len} tokens have "
            f"{2 * block_len} positions, got {n}"
        )


def induction_score(patterns: Tensor, block_len: int) -> Tensor:
    """Mean attention from q (second copy, q ≥ L) to q − L + 1 -> (...).

    ``patterns`` are those of sequences made of a block of ``block_len`` = L tokens
    repeated twice (length 2L).
    """
    _check_repeated(patterns, block_len)
    return _diag_mean(patterns, 1 - block_len, block_len)


def duplicate_token_score(patterns: Tensor, block_len: int) -> Tensor:
    """Mean attention from q (second copy, q ≥ L) to q − L -> (...)."""
    _check_repeated(patterns, block_len)
    return _diag_mean(patterns, -block_len, block_len)


def repeated_random_tokens(
    n_sequences: int,
    block_len: int,
    vocab: Sequence[int] | int,
    seed: int = 0,
) -> Tensor:
    """Sequences made of a random block repeated twice: LongTensor (n_sequences, 2 * block_len).

    Block tokens are drawn from ``vocab`` (token ids, or an int V for 0..V−1) without
    replacement when ``block_len`` ≤ the vocabulary size, with replacement otherwise, by a
    numpy Generator seeded with ``seed``.
    """
    n_sequences = check_int("n_sequences", n_sequences, minimum=1)
    block_len = check_int("block_len", block_len, minimum=1)
    ids = np.arange(vocab) if isinstance(vocab, (int, np.integer)) else np.asarray(vocab)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"vocab must be a positive int or a non-empty list of ids, got {vocab!r}")
    rng = np.random.default_rng(seed)
    replace = block_len > ids.size
    block = np.stack([rng.choice(ids, size=block_len, replace=replace) for _ in range(n_sequences)])
    return torch.from_numpy(np.concatenate([block, block], axis=1).astype(np.int64))


@torch.no_grad()
def head_role_scores(
    model: torch.nn.Module,
    tokens: Tensor | None = None,
    *,
    seq_len: int | None = None,
    n_repeats: int = 32,
    vocab: Sequence[int] | int | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """Role scores of every attention head of a model that reports its attention patterns.

    Args:
        model: an ``nn.Module`` with ``model.attention_patterns(tokens)`` returning
            probabilities (n_layers, batch, n_heads, q, k) and ``model.cfg`` with ``n_ctx``,
            ``d_vocab``, ``n_layers`` and ``n_heads`` (e.g. the demo's
            ``AttnOnlyTransformer``); its weights are not changed.
        tokens: optional LongTensor (batch, pos) of ordinary text on which
            ``previous_token``, ``self`` and ``first_token`` are measured; ``None``: on the
            repeated random sequences.
        seq_len: length L of the random block (sequences are 2L long); default
            ``n_ctx // 2``.
        n_repeats: number of repeated random sequences.
        vocab: token ids the blocks are drawn from (or an int V for 0..V−1); default the
            whole vocabulary.
        seed: seed of the random blocks; the same seed gives the same scores.

    Returns:
        Dataset over ``component`` (names ``L{layer}H{head}``, as
        :func:`~bayes_susc.demo.model.head_components`) with one variable per
        name in :data:`ROLE_SCORES`, each in [0, 1], and ``layer``/``head`` coordinates.
    """
    cfg = model.cfg
    block_len = cfg.n_ctx // 2 if seq_len is None else check_int("seq_len", seq_len, minimum=1)
    if 2 * block_len > cfg.n_ctx:
        raise ValueError(
            f"seq_len must be <= n_ctx // 2 = {cfg.n_ctx // 2} (the block is repeated "
            f"twice), got {block_len}"
        )
    if block_len < 1:
        raise ValueError(f"the model's n_ctx ({cfg.n_ctx}) is too short for repeated sequences")
    n_repeats = check_int("n_repeats", n_repeats, minimum=1)
    vocab = cfg.d_vocab if vocab is None else vocab
    device = next(model.parameters()).device
    repeated = repeated_random_tokens(n_repeats, block_len, vocab, seed).to(device)
    was_training = model.training
    model.eval()
    try:
        rep = model.attention_patterns(repeated).float()  # (layer, batch, head, q, k)
        rep = rep.transpose(1, 2)  # (layer, head, batch, q, k)
        if tokens is None:
            text = rep
        else:
            if tokens.dim() != 2 or tokens.shape[1] < 2:
                raise ValueError(
                    f"tokens must be a LongTensor (batch, pos) with pos >= 2, got shape "
                    f"{tuple(tokens.shape)}"
                )
            text = model.attention_patterns(tokens.to(device)).float().transpose(1, 2)
    finally:
        model.train(was_training)
    scores = {
        "previous_token": previous_token_score(text),
        "induction": induction_score(rep, block_len),
        "duplicate_token": duplicate_token_score(rep, block_len),
        "first_token": first_token_score(text),
        "self": self_score(text),
    }
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    layer = np.repeat(np.arange(n_layers), n_heads)
    head = np.tile(np.arange(n_heads), n_layers)
    coords = {
        "component": [f"L{lay}H{h}" for lay, h in zip(layer, head)],
        "layer": ("component", layer),
        "head": ("component", head),
    }
    data = {
        name: ("component", np.clip(s.reshape(-1).cpu().double().numpy(), 0.0, 1.0))
        for name, s in scores.items()
    }
    ds = xr.Dataset(data, coords=coords)
    descriptions = {
        "previous_token": "mean attention from q to q-1",
        "induction": "repeated random block of L tokens: mean attention from q >= L to q-L+1",
        "duplicate_token": "repeated random block of L tokens: mean attention from q >= L to q-L",
        "first_token": "mean attention from q >= 1 to position 0",
        "self": "mean attention from q >= 1 to q",
    }
    for name, text_ in descriptions.items():
        ds[name].attrs["description"] = text_
    ds.attrs.update(
        {
            "block_len": block_len,
            "n_repeats": n_repeats,
            "seed": int(seed),
            "position_scores_on": "random repeated sequences" if tokens is None else "tokens",
        }
    )
    return ds

"""Head-role scores against hand-built attention patterns and a hand-wired transformer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayes_susc.checks.head_roles import (
    ROLE_SCORES,
    duplicate_token_score,
    first_token_score,
    head_role_scores,
    induction_score,
    previous_token_score,
    repeated_random_tokens,
    self_score,
)
from bayes_susc.demo.model import AttnOnlyConfig, AttnOnlyTransformer, head_components

L = 8  # block length; sequences are 2L long
N = 2 * L


def _one_hot_pattern(target) -> torch.Tensor:
    """(q, k) pattern attending from each q to key target(q) (must be <= q)."""
    p = torch.zeros(N, N)
    for q in range(N):
        p[q, target(q)] = 1.0
    return p


def test_scores_of_hand_built_patterns():
    patterns = torch.stack(
        [
            _one_hot_pattern(lambda q: max(q - 1, 0)),  # previous token
            _one_hot_pattern(lambda q: q),  # self
            _one_hot_pattern(lambda q: 0),  # first token
            _one_hot_pattern(lambda q: q - L + 1 if q >= L else q),  # induction (else self)
            _one_hot_pattern(lambda q: q - L if q >= L else 0),  # duplicate (else first)
        ]
    )[:, None].expand(5, 3, N, N)  # (head, batch, q, k)
    got = np.stack(
        [
            f(patterns).numpy()
            for f in (previous_token_score, self_score, first_token_score)
            + (lambda p: induction_score(p, L), lambda p: duplicate_token_score(p, L))
        ],
        axis=1,
    )  # (head, score)
    # Position scores average over q = 1..N-1 (N - 1 queries), the repeat scores over
    # q = L..N-1 (L queries).
    want = np.array(
        [
            # prev      self           first        induction duplicate
            [1.0, 0.0, 1 / (N - 1), 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 0.0],
            [1 / (N - 1), 0.0, 1.0, 0.0, 1 / L],  # q = L: q - L = 0
            [0.0, (L - 1) / (N - 1), 0.0, 1.0, 0.0],
            [1 / (N - 1), 0.0, L / (N - 1), 0.0, 1.0],  # first: q = 1..L-1 and q = L
        ]
    )
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_pattern_shape_errors():
    with pytest.raises(ValueError, match="2L|positions"):
        induction_score(torch.zeros(1, 10, 10), 4)
    with pytest.raises(ValueError, match="q == k"):
        previous_token_score(torch.zeros(2, 3, 4))


def _wired_model(c: float = 1000.0) -> AttnOnlyTransformer:
    """A 2-layer, 2-head model whose heads have exact roles on repeated sequences.

    Residual stream: one-hot position (dims 0..N-1), one-hot token (N..2N-1), and the
    previous token written by L0H0 (2N..3N-1); vocabulary = N tokens, no LayerNorm.
    L0H0 previous token, L0H1 self, L1H0 first token, L1H1 induction (self in the first
    copy, where the token has no earlier occurrence).
    """
    v = N
    cfg = AttnOnlyConfig(
        n_layers=2, n_heads=2, d_model=3 * N, d_head=3 * N, n_ctx=N, d_vocab=v, layernorm=False
    )
    model = AttnOnlyTransformer(cfg, generator=0)
    pos, tok, prev = np.arange(N), N + np.arange(v), 2 * N + np.arange(v)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.pos_embed.W_pos[pos, pos] = 1.0
        model.embed.W_E[np.arange(v), tok] = 1.0
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        # L0H0: query at position p looks for key position p - 1; copies the key's token
        # into the "previous token" subspace.
        a0.W_Q[0, pos[1:], pos[:-1]] = c
        a0.W_K[0, pos, pos] = 1.0
        a0.W_V[0, tok, np.arange(v)] = 1.0
        a0.W_O[0, np.arange(v), prev] = 1.0
        # L0H1: self (writes nothing).
        a0.W_Q[1, pos, pos] = c
        a0.W_K[1, pos, pos] = 1.0
        # L1H0: a constant query that matches position 0 only.
        a1.b_Q[0, 0] = c
        a1.W_K[0, 0, 0] = 1.0
        # L1H1: current token vs the key's previous token (c), self as fallback (c / 2),
        # key position 0 penalized (its "previous token" is its own token).
        a1.W_Q[1, tok, np.arange(v)] = c
        a1.W_K[1, prev, np.arange(v)] = 1.0
        a1.W_Q[1, pos, v + pos] = c / 2
        a1.W_K[1, pos, v + pos] = 1.0
        a1.b_Q[1, 2 * N] = c
        a1.W_K[1, 0, 2 * N] = -1.0
    return model


def test_hand_wired_model_scores():
    model = _wired_model()
    ds = head_role_scores(model, seq_len=L, n_repeats=16, seed=3)
    assert list(ds["component"].values) == [c.name for c in head_components(model)]
    assert list(ds.data_vars) == list(ROLE_SCORES)
    got = np.stack([ds[name].values for name in ROLE_SCORES], axis=1)
    want = np.array(
        [
            # prev       induction dup    first        self
            [1.0, 0.0, 0.0, 1 / (N - 1), 0.0],  # L0H0 previous token
            [0.0, 0.0, 0.0, 0.0, 1.0],  # L0H1 self
            [1 / (N - 1), 0.0, 1 / L, 1.0, 0.0],  # L1H0 first token
            [0.0, 1.0, 0.0, 0.0, (L - 1) / (N - 1)],  # L1H1 induction
        ]
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    # The exact previous-token head scores 1 and every other head (almost) nothing.
    assert ds["previous_token"].values[0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(ds["previous_token"].values[1:] <= 1 / (N - 1) + 1e-6)


def test_scores_in_unit_interval_and_deterministic():
    cfg = AttnOnlyConfig(n_layers=2, n_heads=3, d_model=32, d_head=8, n_ctx=24)
    model = AttnOnlyTransformer(cfg, generator=1)
    text = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    a = head_role_scores(model, text, n_repeats=8, seed=5)
    b = head_role_scores(model, text, n_repeats=8, seed=5)
    c = head_role_scores(model, text, n_repeats=8, seed=6)
    assert a.identical(b)
    assert not a["induction"].equals(c["induction"])
    assert a.attrs["block_len"] == 12
    for name in ROLE_SCORES:
        v = a[name].values
        assert v.shape == (6,) and np.all((v >= 0) & (v <= 1))
    # An untrained model attends almost uniformly: the mean over q = L..2L-1 of 1/(q+1).
    uniform = np.mean(1 / (np.arange(12, 24) + 1))
    np.testing.assert_allclose(a["induction"].values, uniform, rtol=0.2)


def test_repeated_random_tokens():
    t = repeated_random_tokens(5, 6, [10, 11, 12, 13, 14, 15, 16], seed=0)
    assert t.shape == (5, 12) and t.dtype == torch.long
    assert torch.equal(t[:, :6], t[:, 6:])
    for row in t[:, :6]:
        assert len(set(row.tolist())) == 6  # without replacement
        assert set(row.tolist()) <= set(range(10, 17))
    assert torch.equal(t, repeated_random_tokens(5, 6, [10, 11, 12, 13, 14, 15, 16], seed=0))


def test_argument_errors():
    model = AttnOnlyTransformer(AttnOnlyConfig(n_layers=1, n_heads=1, n_ctx=8), generator=0)
    with pytest.raises(ValueError, match="seq_len must be <= n_ctx // 2 = 4"):
        head_role_scores(model, seq_len=5)
    with pytest.raises(ValueError, match="n_repeats must be >= 1"):
        head_role_scores(model, n_repeats=0)

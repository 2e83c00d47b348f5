"""Tests of the demo attention-only transformer, the byte corpus and the training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from bayes_susc.demo.corpus import decode, load_corpus, mixed_corpus
from bayes_susc.demo.model import (
    AttnOnlyConfig,
    AttnOnlyTransformer,
    attention_patterns,
    next_token_loss,
)
from bayes_susc.demo.train import train

SMALL = AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=32)


def _tokens(batch: int = 3, pos: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, pos), generator=torch.Generator().manual_seed(seed))


class _Loss(nn.Module):
    """Wraps ``next_token_loss`` so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self.model, tokens)


def test_logits_shape_and_patterns() -> None:
    model = AttnOnlyTransformer(SMALL, generator=0)
    tokens = _tokens(3, 16)
    assert model(tokens).shape == (3, 16, 256)
    pats = attention_patterns(model, tokens)
    assert pats.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(pats.sum(-1), torch.ones(2, 3, 4, 16))
    assert torch.all(torch.triu(pats, diagonal=1) == 0)


def test_causality() -> None:
    model = AttnOnlyTransformer(SMALL, generator=1)
    tokens = _tokens(2, 20)
    base = model(tokens)
    for t in (0, 7, 19):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("layernorm", [True, False])
def test_parameter_names_and_shapes(layernorm: bool) -> None:
    cfg = AttnOnlyConfig(layernorm=layernorm)
    model = AttnOnlyTransformer(cfg, generator=0)
    n, d, e, c, v = 8, 128, 16, 128, 256
    expected = {"embed.W_E": (v, d), "pos_embed.W_pos": (c, d)}
    for layer in range(2):
        p = f"blocks.{layer}."
        if layernorm:
            expected |= {p + "ln1.w": (d,), p + "ln1.b": (d,)}
        expected |= {p + f"attn.W_{x}": (n, d, e) for x in "QKV"}
        expected |= {p + f"attn.b_{x}": (n, e) for x in "QKV"}
        expected |= {p + "attn.W_O": (n, e, d), p + "attn.b_O": (d,)}
    if layernorm:
        expected |= {"ln_final.w": (d,), "ln_final.b": (d,)}
    expected |= {"unembed.W_U": (d, v), "unembed.b_U": (v,)}
    got = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert got == expected
    assert set(model.state_dict()) == set(expected)  # the mask buffer is not persistent
    # Init: biases zero, LN weights one, weights std ~0.02; seeded init is reproducible.
    assert torch.all(model.blocks[0].attn.b_Q == 0) and torch.all(model.unembed.b_U == 0)
    if layernorm:
        assert torch.all(model.ln_final.w == 1)
    assert abs(model.embed.W_E.std().item() - 0.02) < 1e-3
    twin = AttnOnlyTransformer(cfg, generator=0)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )


def test_initial_loss_near_uniform() -> None:
    # Uniform random bytes: at init every logit is ~N(0, 0.23^2), so the loss is ~log(256).
    model = AttnOnlyTransformer(generator=0)
    tokens = _tokens(8, 64)
    loss = next_token_loss(model, tokens)
    assert loss.shape == (8, 63)
    assert abs(loss.mean().item() - math.log(256)) < 0.1


def test_vmap_over_parameter_copies() -> None:
    model = AttnOnlyTransformer(SMALL, generator=2)
    wrapper = _Loss(model)
    tokens = _tokens(3, 12)
    params = {k: p.detach() for k, p in wrapper.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    copies = [
        {k: p + 0.01 * torch.randn(p.shape, generator=gen) for k, p in params.items()}
        for _ in range(3)
    ]
    stacked = {k: torch.stack([c[k] for c in copies]) for k in params}
    batched = vmap(lambda p: functional_call(wrapper, p, (tokens,)))(stacked)
    assert batched.shape == (3, 3, 11)
    for i, c in enumerate(copies):
        torch.testing.assert_close(
            batched[i], functional_call(wrapper, c, (tokens,)), atol=1e-5, rtol=0
        )
    # Gradients vectorize too.
    grads = vmap(grad(lambda p: functional_call(wrapper, p, (tokens,)).mean()))(stacked)
    assert grads["model.blocks.0.attn.W_Q"].shape == (3, 4, 32, 8)


def test_zero_output_weight_kills_head_gradients() -> None:
    model = AttnOnlyTransformer(SMALL, generator=4)
    wrapper = _Loss(model)
    tokens = _tokens(4, 16)
    h = 1
    params = {k: p.detach().clone() for k, p in wrapper.named_parameters()}
    pre = "model.blocks.0.attn."
    params[pre + "W_O"][h] = 0.0
    g = grad(lambda p: functional_call(wrapper, p, (tokens,)).mean())(params)
    for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
        assert torch.all(g[pre + name][h] == 0), name
        others = torch.cat([g[pre + name][:h].flatten(), g[pre + name][h + 1 :].flatten()])
        assert torch.all(others.reshape(SMALL.n_heads - 1, -1).abs().sum(-1) > 0), name


def test_corpus_deterministic_and_distinct() -> None:
    a = load_corpus("code", 16, 64, seed=5)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() <= 255
    assert torch.equal(a, load_corpus("code", 16, 64, seed=5))
    assert not torch.equal(a, load_corpus("code", 16, 64, seed=6))
    assert isinstance(decode(a[0]), str) and len(decode(a[0])) > 0

    code = load_corpus("code", 256, 64, seed=0).flatten()
    prose = load_corpus("prose", 256, 64, seed=0).flatten()

    def rate(x: torch.Tensor) -> float:
        return ((x == ord("(")) | (x == ord("_"))).float().mean().item()

    assert rate(code) > 2 * rate(prose)

    tokens, kinds = mixed_corpus(20, 32, seed=1, code_fraction=0.25)
    assert tokens.shape == (20, 32) and len(kinds) == 20
    assert (np.asarray(kinds) == "code").sum() == 5
    tokens2, kinds2 = mixed_corpus(20, 32, seed=1, code_fraction=0.25)
    assert torch.equal(tokens, tokens2) and list(kinds) == list(kinds2)


def test_training_lowers_loss() -> None:
    tokens = load_corpus("code", 64, 64, seed=0)
    model = AttnOnlyTransformer(generator=0)
    with torch.no_grad():
        before = next_token_loss(model, tokens).mean().item()
    hist = train(model, tokens, steps=100, batch_size=16, lr=3e-3, seed=0)
    assert len(hist) == 100 and all(isinstance(x, float) for x in hist)
    with torch.no_grad():
        after = next_token_loss(model, tokens).mean().item()
    assert before - after > 0.5
    # Same init and seed: the same run.
    twin = AttnOnlyTransformer(generator=0)
    assert train(twin, tokens, steps=10, batch_size=16, lr=3e-3, seed=0) == hist[:10]

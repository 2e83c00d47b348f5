"""The shared-prefix path (``bayes_susc.target.splits``) computes what the plain per-replica
path computes: the same per-item losses and gradients to float tolerance, and the same
draws for the same seed. Tolerances: float32 rounding of differently ordered sums,
~1e-6 on losses of order 5 nats; gradients of order 50 agree to ~1e-5."""

from __future__ import annotations

import warnings

import pytest
import torch
from tl_compat import hooked_transformer_lens

from bayes_susc import LocalPosterior, sample
from bayes_susc.demo.model import (
    AttnOnlyConfig,
    AttnOnlyTransformer,
    head_components,
    next_token_loss,
)
from bayes_susc.target.components import Component
from bayes_susc.target.splits import (
    ForwardSplit,
    find_split,
    head_of,
    register_split,
    unregister_split,
)


def _model(layernorm: bool = True) -> AttnOnlyTransformer:
    cfg = AttnOnlyConfig(
        n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=16, d_vocab=40, layernorm=layernorm
    )
    return AttnOnlyTransformer(cfg, generator=3)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 40, (n, 16), generator=torch.Generator().manual_seed(seed))


def _pair(model, component, batches):
    fast = LocalPosterior(model, next_token_loss, batches, component)
    plain = LocalPosterior(model, next_token_loss, batches, component, split=None)
    return fast, plain


def _compare_with_plain(fast, plain, batch, probe, *, spread, seed, atol_loss, atol_grad):
    """Probe losses, and the potential and gradient on ``batch``, agree between the split
    path ``fast`` and the ``plain`` one at 3 positions ``spread`` around the anchor;
    returns the plain path's (losses, grad)."""
    positions = fast.anchor_vector + spread * torch.randn(
        3, fast.dim, generator=torch.Generator().manual_seed(seed)
    )
    a, b = fast.batch_item_losses(positions, probe), plain.batch_item_losses(positions, probe)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=atol_loss)
    ga, gb = fast.potential_and_grad(positions, batch), plain.potential_and_grad(positions, batch)
    torch.testing.assert_close(ga.potential, gb.potential, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ga.grad, gb.grad, rtol=1e-5, atol=atol_grad)
    return b, gb.grad


@pytest.mark.parametrize("layernorm", [True, False])
@pytest.mark.parametrize("name", ["L0H1", "L1H3"])
def test_split_losses_and_gradients_match_plain(name, layernorm):
    model = _model(layernorm)
    component = {c.name: c for c in head_components(model)}[name]
    batches = [_tokens(4, 0), _tokens(4, 1)]
    fast, plain = _pair(model, component, batches)
    assert fast.split is not None and fast.describe()["split"] == "attn_only_head"
    # The map above the head (next layer's Q/K/V, or the unembedding) runs low-rank.
    assert fast.split.readout is not None
    assert plain.split is None
    losses, grad = _compare_with_plain(
        fast, plain, batches[1], [_tokens(5, 7)], spread=0.1, seed=1, atol_loss=1e-5, atol_grad=1e-4
    )
    assert losses.shape == (3, 5 * 15)
    # The gradient is not trivially small: the comparison has something to compare.
    assert grad.abs().max() > 1.0


def test_replica_broadcasting_loss_equals_vmapped_loss():
    """``next_token_loss`` declares ``broadcasts_replicas``: called once on all replicas'
    logits it gives what the per-replica (vmapped) call of the same loss gives."""
    model = _model()
    component = {c.name: c for c in head_components(model)}["L0H1"]
    batches = [_tokens(4, 0)]
    assert next_token_loss.broadcasts_replicas is True
    broadcast = LocalPosterior(model, next_token_loss, batches, component)
    vmapped = LocalPosterior(model, lambda m, t: next_token_loss(m, t), batches, component)
    positions = broadcast.anchor_vector + 0.1 * torch.randn(
        3, broadcast.dim, generator=torch.Generator().manual_seed(2)
    )
    a, b = (
        broadcast.potential_and_grad(positions, batches[0]),
        vmapped.potential_and_grad(positions, batches[0]),
    )
    torch.testing.assert_close(a.potential, b.potential, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-5)
    probe = [_tokens(5, 7)]
    torch.testing.assert_close(
        broadcast.batch_item_losses(positions, probe), vmapped.batch_item_losses(positions, probe)
    )


@pytest.mark.parametrize("name", ["L0H2", "L1H0"])
def test_split_draws_equal_plain_draws(name):
    model = _model()
    component = {c.name: c for c in head_components(model)}[name]
    batches = [_tokens(4, s) for s in range(3)]
    fast, plain = _pair(model, component, batches)
    kwargs = dict(
        step_size=1e-3,
        eval_data=_tokens(4, 10),
        probe_data=[_tokens(3, 11), _tokens(2, 12)],
        num_chains=3,
        num_draws=15,
        num_burnin=5,
        seed=4,
    )
    a, b = sample(fast, "sgld", **kwargs), sample(plain, "sgld", **kwargs)
    for var in ("phi", "eval_loss", "probe_loss"):
        x, y = a.posterior[var].values, b.posterior[var].values
        assert x.shape == y.shape
        assert abs(x - y).max() < 1e-4, var
    # The draws moved: the comparison is not between two copies of the anchor.
    assert a.posterior["phi"].values.std() > 1e-4


def test_cache_bound_zero_recomputes_and_agrees():
    model = _model()
    component = head_components(model)[5]
    batches = [_tokens(4, 0), _tokens(4, 1)]
    bounded = LocalPosterior(model, next_token_loss, batches, component, prefix_cache_bytes=0)
    free = LocalPosterior(model, next_token_loss, batches, component)
    positions = free.anchor_vector.expand(2, -1).clone()
    for batch in batches + batches:
        torch.testing.assert_close(
            bounded.batch_item_losses(positions, [batch]),
            free.batch_item_losses(positions, [batch]),
        )
    assert len(bounded._prefix_cache) == 1  # the newest entry only
    assert len(free._prefix_cache) == 2


def test_split_found_only_for_single_heads():
    model = _model()
    heads = head_components(model)
    assert head_of(heads[6].resolve(model)) == ("", 1, 2)
    two_heads = Component("two", {"blocks.0.attn.W_Q": (slice(0, 2),)})
    embedding = Component.from_parameters("embed", ["embed.W_E"])
    output_bias = Component.from_parameters("bO", ["blocks.1.attn.b_O"])
    for component in (two_heads, embedding, output_bias):
        assert find_split(model, component.resolve(model)) is None
        assert LocalPosterior(model, next_token_loss, [_tokens(2, 0)], component).split is None
    # A mask inside one head still splits: the head's other entries come from the anchor.
    mask = torch.zeros(4, 32, 8, dtype=torch.bool)
    mask[3, :5] = True
    masked = Component("masked", {"blocks.1.attn.W_K": mask})
    assert head_of(masked.resolve(model)) == ("", 1, 3)


def test_wrong_split_warns_and_falls_back():
    model = _model()
    component = head_components(model)[0]

    class Wrong(ForwardSplit):
        name = "wrong"

        def prefix(self, tokens):
            return tokens

        def suffix(self, params, cached):
            replicas = next(iter(params.values())).shape[0]
            return torch.zeros((replicas,) + cached.shape + (40,))

    with pytest.warns(UserWarning, match="does not reproduce loss_fn"):
        posterior = LocalPosterior(
            model, next_token_loss, [_tokens(2, 0)], component, split=Wrong()
        )
    assert posterior.split is None


def test_loss_calling_model_on_other_inputs_falls_back():
    model = _model()
    component = head_components(model)[4]

    def halves(m, tokens):  # two model calls, on inputs that are not the batch
        return torch.cat([next_token_loss(m, tokens[:, :8]), next_token_loss(m, tokens[:, 8:])], 1)

    with pytest.warns(UserWarning, match="inputs not of its batch"):
        posterior = LocalPosterior(model, halves, [_tokens(2, 0)], component)
    assert posterior.split is None

    def twice(m, tokens):  # the same call twice: replayed, and the split stays
        return 0.5 * (next_token_loss(m, tokens) + next_token_loss(m, tokens))

    fast = LocalPosterior(model, twice, [_tokens(2, 0)], component)
    assert fast.split is not None
    plain = LocalPosterior(model, twice, [_tokens(2, 0)], component, split=None)
    positions = fast.anchor_vector + 0.1 * torch.randn(
        2, fast.dim, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(
        fast.batch_item_losses(positions, [_tokens(3, 1)]),
        plain.batch_item_losses(positions, [_tokens(3, 1)]),
        rtol=0,
        atol=1e-5,
    )


def test_registered_split_is_used_and_removed():
    model = _model()
    component = head_components(model)[1]
    seen = []

    def factory(m, resolved):
        seen.append(resolved.name)
        return None

    register_split(factory)
    try:
        LocalPosterior(model, next_token_loss, [_tokens(2, 0)], component)
    finally:
        unregister_split(factory)
    assert seen == ["L0H1"]
    with pytest.raises(ValueError, match="not a registered"):
        unregister_split(factory)
    with pytest.raises(TypeError, match="split must be"):
        LocalPosterior(model, next_token_loss, [_tokens(2, 0)], component, split="fast")


def _tl_model(attn_only: bool, norm: str, seed: int):
    """A tiny random TransformerLens model (2 layers, 4 heads, d_model 32, ctx 16)."""
    tl = hooked_transformer_lens()  # skips under TransformerLens 4.x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cfg = tl.HookedTransformerConfig(
            n_layers=2,
            d_model=32,
            n_ctx=16,
            d_head=8,
            n_heads=4,
            d_vocab=50,
            act_fn="gelu",
            attn_only=attn_only,
            seed=seed,
            normalization_type=norm,
        )
        return tl.HookedTransformer(cfg)


def _assert_split_matches_plain(model, component, tokens, name, atol_loss, atol_grad):
    from bayes_susc.pipeline.config import causal_lm_loss

    fast = LocalPosterior(model, causal_lm_loss, [tokens], component)
    plain = LocalPosterior(model, causal_lm_loss, [tokens], component, split=None)
    assert fast.describe()["split"] == name, component.name
    _compare_with_plain(
        fast, plain, tokens, [tokens], spread=0.05, seed=4, atol_loss=atol_loss, atol_grad=atol_grad
    )


@pytest.mark.parametrize(("attn_only", "norm"), [(True, "LN"), (False, "LN"), (True, "LNPre")])
def test_transformer_lens_head_split_matches_plain(attn_only, norm):
    from bayes_susc.target.architectures import attention_heads

    model = _tl_model(attn_only, norm, seed=0)
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    for component in attention_heads(model)[::3]:
        _assert_split_matches_plain(model, component, tokens, "transformer_lens_head", 1e-5, 1e-4)
    # Low-rank readout above the head only where nothing but a norm and a linear map
    # follows it (not an MLP).
    from bayes_susc.target.splits import find_split

    split = find_split(model, attention_heads(model)[0].resolve(model))
    assert (split.readout is not None) == attn_only


@pytest.mark.parametrize("norm", ["LN", "LNPre"])
def test_transformer_lens_replica_forward_matches_plain(norm):
    """Components other than single heads (all weights; two heads; an embedding) of an
    attention-only TransformerLens model take the replica-batched forward."""
    from bayes_susc.target.architectures import by_regex

    model = _tl_model(True, norm, seed=1)
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    components = [
        by_regex("full", model, ".*"),
        Component("two_heads", {"blocks.1.attn.W_V": (slice(1, 3),)}),
        Component.from_parameters("embed", ["embed.W_E"]),
    ]
    for component in components:
        _assert_split_matches_plain(
            model, component, tokens, "transformer_lens_replicas", 2e-5, 2e-4
        )


def test_heads_of_a_layer_share_one_prefix_per_batch():
    """The frozen part up to a layer is computed once per batch for all heads of that
    layer; an in-place change of the tokens or of the weights is never served stale."""
    model = _model()
    heads = {c.name: c.resolve(model) for c in head_components(model)}
    a, b, other = (find_split(model, heads[n]) for n in ("L1H0", "L1H2", "L0H1"))
    assert a.layer_prefix is b.layer_prefix
    assert other.layer_prefix is not a.layer_prefix
    calls = []
    for split in (a, b):
        compute = split._layer_prefix
        split._layer_prefix = lambda t, compute=compute: calls.append(1) or compute(t)
    tokens = _tokens(3, 5)
    first = a.prefix(tokens)
    second = b.prefix(tokens)
    assert len(calls) == 1
    assert first[1] is second[1]  # the same residual stream, not a copy
    # Each head takes its own slice of the layer's attention outputs.
    assert torch.equal(first[2], a.layer_prefix(tokens, a._layer_prefix)[2][:, :, 0])
    assert torch.equal(second[2], a.layer_prefix(tokens, a._layer_prefix)[2][:, :, 2])
    tokens[0, 0] = (tokens[0, 0] + 1) % 40  # in place: the cached prefix is stale
    b.prefix(tokens)
    assert len(calls) == 2
    # New weights (an optimizer step) make new splits use a new cache.
    with torch.no_grad():
        model.blocks[0].attn.W_Q.add_(0.01)
    assert find_split(model, heads["L1H0"]).layer_prefix is not a.layer_prefix
    # And what the split computes then matches the plain forward with the new weights.
    fast = LocalPosterior(model, next_token_loss, [_tokens(4, 0)], head_components(model)[5])
    assert fast.split is not None
    plain = LocalPosterior(
        model, next_token_loss, [_tokens(4, 0)], head_components(model)[5], split=None
    )
    torch.testing.assert_close(
        fast.batch_item_losses(fast.anchor_vector[None], [tokens]),
        plain.batch_item_losses(plain.anchor_vector[None], [tokens]),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("model_kind", ["attn_only", "tl_with_mlp"])
def test_layer_above_starts_from_the_prefix_of_the_layer_below(model_kind):
    """A head split of layer 1 takes the residual stream entering its layer from the
    shared prefix of layer 0 when that holds the batch (then only the layer-0 MLP, if
    any, runs): the embedding is not run again, and the prefix is bit-identical to the
    one computed from the tokens."""
    from bayes_susc.target.architectures import attention_heads

    if model_kind == "attn_only":
        model, tokens = _model(), _tokens(3, 1)
        heads = [c.resolve(model) for c in head_components(model)]
    else:
        model = _tl_model(False, "LN", seed=2)
        tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
        heads = [c.resolve(model) for c in attention_heads(model)]
    low, high = find_split(model, heads[1]), find_split(model, heads[-1])
    assert (low.layer, high.layer) == (0, 1)
    fresh = high._layer_prefix(tokens)  # from the embedding: nothing cached yet
    low.prefix(tokens)
    embeds = []
    embed = high.embed
    high.embed = lambda t: embeds.append(1) or embed(t)
    reused = high._layer_prefix(tokens)
    assert embeds == []
    flat_fresh = torch.utils._pytree.tree_leaves(fresh)
    flat_reused = torch.utils._pytree.tree_leaves(reused)
    assert len(flat_fresh) == len(flat_reused) >= 3
    for a, b in zip(flat_fresh, flat_reused):
        assert (a is None and b is None) or torch.equal(a, b)
    # Other tokens (not in the layer-0 cache) still start from the embedding.
    high._layer_prefix(tokens.flip(0))
    assert embeds == [1]


def test_shared_prefix_cache_does_not_keep_the_model_alive():
    """The per-layer caches live in a table weakly keyed by the model; nothing in them may
    reach the model, or every model ever split would stay in memory with its prefixes."""
    import gc
    import weakref

    model = _model()
    split = find_split(model, head_components(model)[5].resolve(model))
    split.prefix(_tokens(2, 0))
    alive = weakref.ref(model)
    del model, split
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("parts", [("W_O",), ("W_Q", "W_K", "b_Q", "b_K"), ("W_V", "W_O")])
def test_split_of_part_of_a_head_matches_plain(layer, parts):
    """A component freeing some of one head's weights (its output map alone, its QK or its
    OV circuit) runs the head split with the rest of the head at the anchor. W_O alone
    leaves the head's attention output the same for every replica; it once failed to
    broadcast in the last layer's low-rank readout."""
    model = _model()
    head = {c.name: c for c in head_components(model)}[f"L{layer}H2"]
    selections = {p: s for p, s in head.selections.items() if p.rsplit(".", 1)[1] in parts}
    component = Component(f"L{layer}H2:{'+'.join(parts)}", selections)
    batches = [_tokens(4, 0)]
    fast, plain = _pair(model, component, batches)
    assert fast.split is not None
    losses, _ = _compare_with_plain(
        fast, plain, batches[0], [_tokens(5, 7)], spread=0.1, seed=2, atol_loss=1e-5, atol_grad=1e-4
    )
    # The replicas differ: the freed weights move each replica's losses.
    assert (losses[0] - losses[1]).abs().max() > 1e-3

"""Components: selections resolve to the right entries, round trips are exact, and bad
selections fail early with messages that name the component and the parameter."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.func import vmap

from bayes_susc import Component, ResolvedComponent
from bayes_susc.demo.model import AttnOnlyConfig, AttnOnlyTransformer

TINY = AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, d_head=8, n_ctx=16)
WQ = "blocks.0.attn.W_Q"  # (2, 16, 8)
WK = "blocks.0.attn.W_K"  # (2, 16, 8)
BQ = "blocks.0.attn.b_Q"  # (2, 8)
WE = "embed.W_E"  # (256, 16)


@pytest.fixture(scope="module")
def model() -> AttnOnlyTransformer:
    m = AttnOnlyTransformer(TINY, generator=0)
    # Non-zero biases, so that "frozen entries kept" is not satisfied by zeros alone.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "b_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return m


@pytest.fixture(scope="module")
def params(model: AttnOnlyTransformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _checker_mask(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.3
    mask.view(-1)[0] = True  # never empty
    return mask


def _selected(shape: tuple[int, ...], flat_idx: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries at the flat positions ``flat_idx``."""
    sel = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
    sel[flat_idx] = True
    return sel.reshape(shape)


# --------------------------------------------------------------------- resolution
@pytest.mark.parametrize("whole", [None, True])
def test_whole_parameter_selection(model, params, whole):
    comp = Component("qk", {WQ: whole, WK: whole}).resolve(model)
    assert isinstance(comp, ResolvedComponent)
    assert comp.param_names == [WQ, WK]
    assert comp.dim == 2 * 2 * 16 * 8
    assert comp.offsets == [0, 256, 512]
    expected = torch.cat([params[WQ].reshape(-1), params[WK].reshape(-1)])
    assert torch.equal(comp.gather(params), expected)
    assert comp.describe() == {WQ: "all (256)", WK: "all (256)"}
    assert Component.from_parameters("qk", [WQ, WK]).resolve(model).dim == comp.dim


@pytest.mark.parametrize(
    "selection",
    [
        1,
        (1,),
        (0, slice(2, 9)),
        slice(0, 1),
        (Ellipsis, slice(2, 6)),
        (slice(None), 3, slice(None, None, 3)),
        (-1, slice(-4, None)),
        (0, Ellipsis, 7),
        (),
    ],
)
def test_index_selection_matches_tensor_indexing(model, params, selection):
    comp = Component("c", {WQ: selection}).resolve(model)
    expected = params[WQ][selection].reshape(-1)
    assert comp.dim == expected.numel()
    # Free entries are laid out in row-major order, as plain indexing gives them.
    assert torch.equal(comp.gather(params), expected)


def test_head_index_description(model):
    comp = Component("L0H1", {WQ: (1,), BQ: 1}).resolve(model)
    assert comp.dim == 16 * 8 + 8
    assert comp.describe() == {WQ: "[1] (128)", BQ: "[1] (8)"}
    assert "L0H1" in repr(comp) and "dim=136" in repr(comp)


def test_mask_selection(model, params):
    mask = _checker_mask((2, 16, 8))
    comp = Component("m", {WQ: mask}).resolve(model)
    assert comp.dim == int(mask.sum())
    assert torch.equal(comp.gather(params), params[WQ][mask])
    assert comp.describe() == {WQ: f"mask ({int(mask.sum())})"}
    assert not comp.is_whole[0]


def test_full_mask_is_whole(model, params):
    comp = Component("m", {WQ: torch.ones(2, 16, 8, dtype=torch.bool)}).resolve(model)
    assert comp.is_whole == [True]
    assert torch.equal(comp.gather(params), params[WQ].reshape(-1))


# ------------------------------------------------------------------- round trips
def _mixed(model) -> ResolvedComponent:
    return Component(
        "mixed",
        {WQ: (1, slice(3, 11)), WE: _checker_mask((256, 16), seed=2), BQ: None},
    ).resolve(model)


def test_gather_scatter_round_trip_exact(model, params):
    comp = _mixed(model)
    anchors = {p: params[p] for p in comp.param_names}
    v = torch.randn(comp.dim, generator=torch.Generator().manual_seed(3))
    full = comp.scatter(v, anchors)
    assert set(full) == set(comp.param_names)
    for p in comp.param_names:
        assert full[p].shape == params[p].shape and full[p].dtype == params[p].dtype
    assert torch.equal(comp.gather(full), v)
    # And the other way: scattering the anchor's own free entries rebuilds the anchor.
    rebuilt = comp.scatter(comp.gather(anchors), anchors)
    for p in comp.param_names:
        assert torch.equal(rebuilt[p], anchors[p])


def test_scatter_leaves_frozen_entries_bit_identical(model, params):
    comp = _mixed(model)
    anchors = {p: params[p].clone() for p in comp.param_names}
    before = {p: t.clone() for p, t in anchors.items()}
    v = 1e3 + torch.randn(comp.dim, generator=torch.Generator().manual_seed(4))
    full = comp.scatter(v, anchors)
    for k, p in enumerate(comp.param_names):
        sel = _selected(params[p].shape, comp.flat_indices[k])
        assert torch.equal(full[p][~sel], anchors[p][~sel])
        assert torch.equal(full[p][sel], v[comp.offsets[k] : comp.offsets[k + 1]])
        # scatter is out of place: the anchors themselves are untouched.
        assert torch.equal(anchors[p], before[p])


def test_scatter_under_vmap(model, params):
    comp = _mixed(model)
    anchors = {p: params[p] for p in comp.param_names}
    vs = torch.randn(3, comp.dim, generator=torch.Generator().manual_seed(5))
    batched = vmap(lambda v: comp.scatter(v, anchors))(vs)
    for c in range(3):
        single = comp.scatter(vs[c], anchors)
        for p in comp.param_names:
            assert torch.equal(batched[p][c], single[p])


# ---------------------------------------------------------------------- from_regex
def test_from_regex(model, params):
    comp = Component.from_regex("qk", model, r"attn\.W_[QK]$")
    assert dict(comp.selections) == {WQ: None, WK: None}
    resolved = comp.resolve(model)
    assert resolved.dim == 512
    assert torch.equal(
        resolved.gather(params), torch.cat([params[WQ].reshape(-1), params[WK].reshape(-1)])
    )


def test_from_regex_no_match(model):
    with pytest.raises(ValueError, match=re.escape("pattern 'W_Z' matches no parameter")):
        Component.from_regex("z", model, "W_Z")


# -------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("selections", "exc", "pattern"),
    [
        ({}, ValueError, "component 'c' is empty"),
        ({"blocks.0.attn.W_X": None}, ValueError, "unknown parameter 'blocks.0.attn.W_X'"),
        ({WQ: 2}, ValueError, "index 2 out of range for dim 0 of size 2"),
        ({WQ: (0, -17)}, ValueError, "index -17 out of range for dim 1 of size 16"),
        ({WQ: (Ellipsis, slice(0, 99))}, ValueError, "slice 0:99 out of range for dim 2 of size 8"),
        (
            {WQ: (0, slice(-20, None))},
            ValueError,
            "slice -20:None out of range for dim 1 of size 16",
        ),
        ({WQ: torch.ones(2, 16, dtype=torch.bool)}, ValueError, "mask shape (2, 16)"),
        ({WQ: torch.ones(2, 16, 8)}, TypeError, "must be a bool mask, got torch.float32"),
        ({WQ: torch.tensor(1)}, TypeError, "must be a bool mask, got torch.int64"),
        ({WQ: (0, 0, 0, 0)}, ValueError, "index (0, 0, 0, 0) has too many entries"),
        ({WQ: (Ellipsis, 0, Ellipsis)}, ValueError, "too many entries"),
        ({WQ: (Ellipsis, slice(3, 3))}, ValueError, "is empty"),
        ({WQ: torch.zeros(2, 16, 8, dtype=torch.bool)}, ValueError, "is empty"),
        ({WQ: False}, ValueError, "selection False selects nothing"),
        ({WQ: [0, 1]}, TypeError, "index entries must be int, slice or ..."),
        ({WQ: (0, 1.5)}, TypeError, "index entries must be int, slice or ..."),
        ({WQ: (True,)}, TypeError, "index entries must be int, slice or ..."),
        ({WQ: (slice(None, None, -1),)}, ValueError, "slice step must be positive"),
        ({WQ: (slice(None, None, 0),)}, ValueError, "slice step must be positive"),
    ],
)
def test_bad_selection_errors_name_component_and_parameter(model, selections, exc, pattern):
    with pytest.raises(exc, match=re.escape(pattern)) as info:
        Component("c", selections).resolve(model)
    msg = str(info.value)
    assert "'c'" in msg
    for pname in selections:
        assert repr(pname) in msg  # the parameter is named
    if pattern != "is empty" and isinstance(selections.get(WQ), (tuple, int, torch.Tensor)):
        assert "(2, 16, 8)" in msg  # and so is its shape


@pytest.mark.parametrize("name", ["", None])
def test_component_name_must_be_nonempty(model, name):
    with pytest.raises(ValueError, match="component name must be a non-empty string"):
        Component(name, {WQ: None}).resolve(model)


def test_unknown_parameter_suggests_similar_names(model):
    with pytest.raises(ValueError, match=re.escape(WQ)):
        Component("c", {"blocks.1.attn.W_Q": None}).resolve(model)


def test_numpy_integer_index_accepted(model, params):
    comp = Component("c", {WQ: (np.int64(1),)}).resolve(model)
    assert torch.equal(comp.gather(params), params[WQ][1].reshape(-1))

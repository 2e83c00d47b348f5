"""Architecture helpers: each head owns exactly the weights that reach the output through it.

The defining check, per family and per head: with the head's output slice (written out
by hand below, independently of the library) set to zero, the loss gradient vanishes
exactly on the head's query/key/value entries and on no other head's. For grouped-query
attention the shared key/value slices of a group vanish only when every head of the
group is cut off. Models are tiny random-init configs built locally (no hub access).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tl_compat import hooked_transformer_lens
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bayes_susc  # noqa: E402
from bayes_susc.demo.model import (  # noqa: E402
    AttnOnlyConfig,
    AttnOnlyTransformer,
    head_components,
)
from bayes_susc.target.architectures import (  # noqa: E402
    attention_heads,
    by_mask,
    by_parameters,
    by_regex,
    components,
    embeddings,
    kv_heads,
    mlps,
    parameter_components,
    unembedding,
)
from bayes_susc.target.posterior import tied_names  # noqa: E402

N_LAYERS, N_HEADS, N_KV, D_MODEL, D_HEAD, VOCAB, CTX = 2, 4, 2, 32, 8, 50, 16
ALL = slice(None)


def _cols(h: int) -> tuple[slice, slice]:
    return (ALL, slice(h * D_HEAD, (h + 1) * D_HEAD))


def _rows(h: int) -> tuple[slice]:
    return (slice(h * D_HEAD, (h + 1) * D_HEAD),)


@dataclass
class Family:
    """A model family and, written by hand, where each head's output slice lives."""

    package: str | None  # importorskip'd before building
    build: Callable[[], nn.Module]  # float32 random init; the fixture casts to float64
    hf: bool  # logits = model(ids).logits (else model(ids))
    out_slice: Callable[[int, int], tuple[str, tuple]]  # (layer, head) -> (param, index)
    attn_prefix: Callable[[int], str]  # parameters of layer l's attention start with it
    shared: Callable[[int], list[str]]  # layer l's attention parameters no head owns
    n_kv: int = N_HEADS  # key/value heads per layer


def _attn_only():
    cfg = AttnOnlyConfig(
        n_layers=N_LAYERS, n_heads=N_HEADS, d_model=D_MODEL, d_head=D_HEAD, n_ctx=CTX, d_vocab=VOCAB
    )
    return AttnOnlyTransformer(cfg, generator=0)


def _tl(n_kv: int | None):
    tl = hooked_transformer_lens()  # skips under TransformerLens 4.x (bridges below)
    HookedTransformer, HookedTransformerConfig = tl.HookedTransformer, tl.HookedTransformerConfig

    extra = {} if n_kv is None else {"n_key_value_heads": n_kv}
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        n_heads=N_HEADS,
        d_head=D_HEAD,
        d_vocab=VOCAB,
        n_ctx=CTX,
        d_mlp=4 * D_MODEL,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        **extra,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer in 3.x
        return HookedTransformer(cfg)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=N_LAYERS, n_head=N_HEADS, n_embd=D_MODEL, vocab_size=VOCAB, n_positions=CTX
    )
    return GPT2LMHeadModel(cfg)


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        hidden_size=D_MODEL,
        intermediate_size=4 * D_MODEL,
        vocab_size=VOCAB,
        max_position_embeddings=CTX,
    )
    return GPTNeoXForCausalLM(cfg)


def _llama_like(kind: str):
    import transformers

    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    cfg = config_cls(
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        hidden_size=D_MODEL,
        intermediate_size=2 * D_MODEL,
        vocab_size=VOCAB,
        max_position_embeddings=CTX,
    )
    return model_cls(cfg)


def _bridge(build_hf: Callable[[], nn.Module]) -> nn.Module:
    """A TransformerLens TransformerBridge (3.x or 4.x) around a tiny Hugging Face model,
    built locally: the builder ``TransformerBridge.boot_transformers`` calls after loading."""
    transformers = pytest.importorskip("transformers")

    try:
        from transformer_lens.model_bridge.sources._bridge_builder import (
            build_bridge_from_module,
        )
    except ImportError:
        pytest.skip("this TransformerLens has no build_bridge_from_module")
    hf = build_hf()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_bridge_from_module(hf, type(hf).__name__, hf_config=hf.config)


def _compat(bridge: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode()
    return bridge


def _bridge_family(
    hf_attn: Callable[[int], str], out_index: Callable[[int], tuple], n_kv: int, fused: bool
) -> Family:
    """A bridge's attention of layer l is reached as ``hf_attn(l)`` (the Hugging Face
    path with ``._original_component`` segments); its forward reads the maps q, k, v
    (split from the fused qkv weight where the model fuses them) and o (o_proj if not)."""
    o = "o" if fused else "o_proj"
    return Family(
        "transformer_lens",
        None,  # set below: the Hugging Face builder inside _bridge
        False,  # bridge(ids) returns the logits
        lambda l, h: (f"{hf_attn(l)}{o}._original_component.weight", out_index(h)),
        lambda l: hf_attn(l),
        # The o bias is shared; the fused qkv weight, which the bridge split into q, k,
        # v and no longer reads, belongs to no head.
        lambda l: (
            [
                f"{hf_attn(l)}{o}._original_component.bias",
                f"{hf_attn(l)}qkv._original_component.weight",
                f"{hf_attn(l)}qkv._original_component.bias",
            ]
            if fused
            else []
        ),
        n_kv,
    )


def _tl_family(n_kv: int | None) -> Family:
    return Family(
        "transformer_lens",
        lambda: _tl(n_kv),
        False,
        lambda l, h: (f"blocks.{l}.attn.W_O", (h,)),
        lambda l: f"blocks.{l}.attn.",
        lambda l: [f"blocks.{l}.attn.b_O"],
        N_HEADS if n_kv is None else n_kv,
    )


def _llama_family(kind: str) -> Family:
    return Family(
        "transformers",
        lambda: _llama_like(kind),
        True,
        lambda l, h: (f"model.layers.{l}.self_attn.o_proj.weight", _cols(h)),
        lambda l: f"model.layers.{l}.self_attn.",
        lambda l: [],  # no o_proj bias in these configs
        N_KV,
    )


FAMILIES: dict[str, Family] = {
    "attn_only": Family(
        None,
        _attn_only,
        False,
        lambda l, h: (f"blocks.{l}.attn.W_O", (h,)),
        lambda l: f"blocks.{l}.attn.",
        lambda l: [f"blocks.{l}.attn.b_O"],
    ),
    "transformer_lens": _tl_family(None),
    "transformer_lens_gqa": _tl_family(N_KV),
    "gpt2": Family(
        "transformers",
        _gpt2,
        True,
        # Conv1D c_proj (d_model, d_model): input rows h*e:(h+1)*e come from head h.
        lambda l, h: (f"transformer.h.{l}.attn.c_proj.weight", _rows(h)),
        lambda l: f"transformer.h.{l}.attn.",
        lambda l: [f"transformer.h.{l}.attn.c_proj.bias"],
    ),
    "gpt_neox": Family(
        "transformers",
        _neox,
        True,
        # Linear dense (d_model, d_model): input columns h*e:(h+1)*e come from head h.
        lambda l, h: (f"gpt_neox.layers.{l}.attention.dense.weight", _cols(h)),
        lambda l: f"gpt_neox.layers.{l}.attention.",
        lambda l: [f"gpt_neox.layers.{l}.attention.dense.bias"],
    ),
    "llama": _llama_family("llama"),
    "mistral": _llama_family("mistral"),
    "qwen2": _llama_family("qwen2"),  # Llama layout with q/k/v biases
    # TransformerLens TransformerBridge (3.x and 4.x) around the Hugging Face models above.
    # GPT-2: o is the Conv1D c_proj (input rows h*e:(h+1)*e from head h).
    "bridge_gpt2": _bridge_family(
        lambda l: f"transformer.h.{l}._original_component.attn.", _rows, N_HEADS, True
    ),
    # GPT-NeoX: o is the Linear dense (input columns h*e:(h+1)*e).
    "bridge_gpt_neox": _bridge_family(
        lambda l: f"gpt_neox.layers.{l}._original_component.attention.", _cols, N_HEADS, True
    ),
    # Llama (grouped-query): q_proj ... o_proj as they are, o_proj columns h*e:(h+1)*e.
    "bridge_llama": _bridge_family(
        lambda l: f"model.layers.{l}._original_component.self_attn._original_component.",
        _cols,
        N_KV,
        False,
    ),
}
FAMILIES["bridge_gpt2"].build = lambda: _bridge(_gpt2)
# HookedTransformer-equivalent numerics (folded layer norms, centred weights): the same
# q/k/v/o maps, processed in place.
FAMILIES["bridge_gpt2_compat"] = dataclasses.replace(
    FAMILIES["bridge_gpt2"], build=lambda: _compat(_bridge(_gpt2))
)
FAMILIES["bridge_gpt_neox"].build = lambda: _bridge(_neox)
FAMILIES["bridge_llama"].build = lambda: _bridge(lambda: _llama_like("llama"))
GQA = [k for k, f in FAMILIES.items() if f.n_kv < N_HEADS]
_BUILT: dict[str, nn.Module] = {}


def _float64(model: nn.Module) -> nn.Module:
    """The model in float64, eval mode. TransformerLens also keeps a dtype in its config
    and rounds attention patterns to it: set it too, or its forward stays float32-exact
    only (1e-7) and the head splits, exact in float64, fall back to the plain path."""
    model = model.double().eval()
    cfg = getattr(model, "cfg", None)
    if isinstance(getattr(cfg, "dtype", None), torch.dtype):
        cfg.dtype = torch.float64
    return model


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request) -> tuple[str, Family, nn.Module]:
    name = request.param
    fam = FAMILIES[name]
    if fam.package is not None:
        pytest.importorskip(fam.package)
    if name not in _BUILT:
        _BUILT[name] = _float64(fam.build())
    return name, fam, _BUILT[name]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, CTX), generator=torch.Generator().manual_seed(0))


def _loss_fn(hf: bool) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Per-token next-token cross-entropy, unreduced: (batch, pos - 1)."""

    def loss_fn(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids).logits if hf else model(ids)
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")

    return loss_fn


def _grads_with_heads_cut(fam: Family, model: nn.Module, tokens, heads) -> dict[str, torch.Tensor]:
    """Loss gradients of ``model`` with the listed heads' output slices set to zero (in
    place, then restored: a bridge cannot be deep-copied)."""
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for layer, head in heads:
                pname, index = fam.out_slice(layer, head)
                params[pname][index] = 0.0
        loss = _loss_fn(fam.hf)(model, tokens).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    return {
        n: torch.zeros_like(p) if g is None else g
        for (n, p), g in zip(params.items(), grads, strict=True)
    }


def _entries(model: nn.Module, comp, grads, skip: str | None = None) -> torch.Tensor:
    """Gradient entries selected by ``comp`` (leaving out parameter ``skip``), flat."""
    r = comp.resolve(model)
    parts = [
        grads[p].reshape(-1)[idx] for p, idx in zip(r.param_names, r.flat_indices) if p != skip
    ]
    return torch.cat(parts)


def _flat(shape: tuple[int, ...], index: tuple) -> torch.Tensor:
    numel = int(np.prod(shape))
    return torch.arange(numel).reshape(shape)[index].reshape(-1).sort().values


def _by_name(comps) -> dict[str, bayes_susc.Component]:
    return {c.name: c for c in comps}


# ------------------------------------------------------------------ the defining check
def test_cutting_a_head_output_zeroes_exactly_its_qkv_gradient(family, tokens):
    name, fam, model = family
    heads = _by_name(attention_heads(model))
    assert sorted(heads) == sorted(f"L{l}H{h}" for l in range(N_LAYERS) for h in range(N_HEADS))
    params = dict(model.named_parameters())
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            out_name, out_index = fam.out_slice(layer, head)
            comp = heads[f"L{layer}H{head}"]
            r = comp.resolve(model)
            # The component's output slice is the hand-written one, exactly.
            k = r.param_names.index(out_name)
            assert torch.equal(r.flat_indices[k], _flat(params[out_name].shape, out_index))
            grads = _grads_with_heads_cut(fam, model, tokens, [(layer, head)])
            qkv = _entries(model, comp, grads, skip=out_name)
            assert qkv.numel() > 0
            assert torch.count_nonzero(qkv) == 0, f"{name} L{layer}H{head}"
            for other, other_comp in heads.items():
                if other == comp.name:
                    continue
                o_layer, o_head = int(other[1]), int(other[3])
                o_out = fam.out_slice(o_layer, o_head)[0]
                g = _entries(model, other_comp, grads, skip=o_out)
                assert torch.count_nonzero(g) > 0, f"{name}: {other} with {comp.name} cut"
                # Its output slice is live too.
                assert torch.count_nonzero(_entries(model, other_comp, grads)) > g.numel() // 2


@pytest.mark.parametrize("name", GQA)
def test_shared_kv_gradient_vanishes_only_when_the_whole_group_is_cut(name, tokens):
    fam = FAMILIES[name]
    if fam.package is not None:
        pytest.importorskip(fam.package)
    model = _BUILT.get(name) or _BUILT.setdefault(name, _float64(fam.build()))
    group = N_HEADS // fam.n_kv
    kv = _by_name(kv_heads(model))
    assert sorted(kv) == sorted(f"L{l}KV{g}" for l in range(N_LAYERS) for g in range(fam.n_kv))
    included = _by_name(attention_heads(model, shared_kv="include"))
    for layer in range(N_LAYERS):
        for g in range(fam.n_kv):
            members = [(layer, h) for h in range(g * group, (g + 1) * group)]
            kv_comp = kv[f"L{layer}KV{g}"]
            # One head of the group cut: its query slice is gradient-free (checked above),
            # the shared K/V slices are not, nor is the rest of its "include" component.
            grads = _grads_with_heads_cut(fam, model, tokens, members[:1])
            assert torch.count_nonzero(_entries(model, kv_comp, grads)) > 0
            h0 = members[0][1]
            out0 = fam.out_slice(layer, h0)[0]
            inc = _entries(model, included[f"L{layer}H{h0}"], grads, skip=out0)
            assert torch.count_nonzero(inc) > 0
            # All heads of the group cut: the shared K/V slices are exactly gradient-free,
            # and so is every head's "include" component outside its output slice.
            grads = _grads_with_heads_cut(fam, model, tokens, members)
            assert torch.count_nonzero(_entries(model, kv_comp, grads)) == 0
            for _, h in members:
                out = fam.out_slice(layer, h)[0]
                inc = _entries(model, included[f"L{layer}H{h}"], grads, skip=out)
                assert torch.count_nonzero(inc) == 0
            for other, other_comp in kv.items():
                if other != kv_comp.name:
                    assert torch.count_nonzero(_entries(model, other_comp, grads)) > 0, other


# ----------------------------------------------------------------- layout bookkeeping
def test_heads_partition_the_attention_parameters(family):
    name, fam, model = family
    params = dict(model.named_parameters())
    comps = attention_heads(model) + kv_heads(model)
    if fam.n_kv == N_HEADS:
        assert kv_heads(model) == []
    for layer in range(N_LAYERS):
        prefix = fam.attn_prefix(layer)
        attn_params = {n: p for n, p in params.items() if n.startswith(prefix)}
        mine = [c for c in comps if c.name.startswith(f"L{layer}")]
        assert len(mine) == N_HEADS + (fam.n_kv if fam.n_kv < N_HEADS else 0)
        covered = {n: torch.zeros(p.numel(), dtype=torch.int64) for n, p in attn_params.items()}
        total_dim = 0
        for c in mine:
            r = c.resolve(model)
            total_dim += r.dim
            for p, idx in zip(r.param_names, r.flat_indices):
                assert p in attn_params, f"{c.name} selects {p} outside layer {layer}'s attention"
                covered[p][idx] += 1
        shared = fam.shared(layer)
        shared_dim = sum(params[n].numel() for n in shared)
        assert total_dim + shared_dim == sum(p.numel() for p in attn_params.values()), name
        for n, count in covered.items():
            expected = 0 if n in shared else 1  # disjoint, and every entry owned once
            assert torch.all(count == expected), f"{name}: {n}"


def test_mlps_embeddings_unembedding_resolve(family):
    name, fam, model = family
    params = dict(model.named_parameters())
    comps = components(model)
    names = [c.name for c in comps]
    assert len(set(names)) == len(names)
    for c in comps:
        assert c.resolve(model).dim > 0
    mlp = mlps(model)
    if name == "attn_only":
        assert mlp == []
    else:
        assert [c.name for c in mlp] == [f"L{l}MLP" for l in range(N_LAYERS)]
        for layer, c in enumerate(mlp):
            # Every parameter of the layer's MLP, whole.
            r = c.resolve(model)
            assert all(p.split(".").count(str(layer)) for p in r.param_names)
            assert r.dim == sum(params[p].numel() for p in r.param_names)
            assert all(".mlp." in p for p in r.param_names)
    emb = [c.name for c in embeddings(model)]
    learned_pos = name in (
        "attn_only",
        "transformer_lens",
        "transformer_lens_gqa",
        "gpt2",
        "bridge_gpt2",
        "bridge_gpt2_compat",
    )
    assert emb == (["embed", "pos_embed"] if learned_pos else ["embed"])
    assert names[: len(emb)] == emb and names[-1] == "unembed"
    un = unembedding(model).resolve(model)
    assert un.dim >= VOCAB * D_MODEL
    if name == "gpt2":  # tied: the embedding's matrix, under its name
        assert un.param_names == ["transformer.wte.weight"]
    if name == "bridge_gpt2":  # the same matrix (TransformerLens 3.x adds a bias)
        assert un.param_names[0] == "transformer.wte._original_component.weight"
    if name == "bridge_gpt2_compat":  # compatibility mode unties it (weight processing)
        assert un.param_names[0] == "lm_head._original_component.weight"


# HF's default sdpa attention on CPU has no vmap batching rule (a per-chain fallback).
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_sampling_one_head_under_vmap(family, tokens):
    """LocalPosterior + sample on head L1H1: the components work with vmap/functional_call."""
    name, fam, model = family
    head = _by_name(attention_heads(model))["L1H1"]
    post = bayes_susc.LocalPosterior(model, _loss_fn(fam.hf), [tokens[:2], tokens[2:]], head)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idata = bayes_susc.sample(
        post,
        "sgld",
        eval_data=tokens,
        probe_data=tokens[:1],
        num_draws=2,
        num_chains=2,
        step_size=1e-4,
        progress=False,
    )
    phi = idata.posterior["phi"].values
    assert phi.shape == (2, 2) and np.isfinite(phi).all()
    assert np.abs(phi).max() > 0  # the head moved and the loss noticed
    assert idata.posterior["probe_loss"].shape == (2, 2, CTX - 1)
    assert not idata.sample_stats["diverged"].values.any()
    for n, p in model.named_parameters():  # the model itself is never written
        assert torch.equal(p, before[n])


# ------------------------------------------------------------------ other entry points
def test_attn_only_heads_match_head_components():
    model = _attn_only()
    assert attention_heads(model) == head_components(model)
    assert attention_heads(model, shared_kv="include") == head_components(model)


def test_components_kinds_and_wrapped_models():
    model = _attn_only()
    assert [c.name for c in components(model, "heads")] == [c.name for c in attention_heads(model)]
    assert [c.name for c in components(model, ["embeddings", "unembedding"])] == [
        "embed",
        "pos_embed",
        "unembed",
    ]
    assert components(model, "kv_heads") == [] and components(model, "mlps") == []
    with pytest.raises(ValueError, match="kind must be one of"):
        components(model, "head")
    with pytest.raises(ValueError, match="shared_kv must be"):
        attention_heads(model, shared_kv="yes")

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.inner = model

    wrapped = Wrapper()
    comps = components(wrapped)
    assert [c.name for c in comps] == [c.name for c in components(model)]
    for c, c0 in zip(comps, components(model)):
        assert list(c.selections) == ["inner." + p for p in c0.selections]
        c.resolve(wrapped)


def test_unsupported_models_fail_naming_what_is_supported():
    with pytest.raises(TypeError, match="AttnOnlyTransformer.*HookedTransformer.*gpt2"):
        attention_heads(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        attention_heads("gpt2")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=D_MODEL,
            num_hidden_layers=1,
            num_attention_heads=N_HEADS,
            intermediate_size=D_MODEL,
            vocab_size=VOCAB,
        )
    )
    with pytest.raises(TypeError, match="model_type='bert'.*supported"):
        mlps(bert)
    base = transformers.GPT2Model(
        transformers.GPT2Config(
            n_layer=1, n_head=N_HEADS, n_embd=D_MODEL, vocab_size=VOCAB, n_positions=CTX
        )
    )
    with pytest.raises(ValueError, match="no unembedding"):
        unembedding(base)
    names = [c.name for c in components(base)]
    assert names[:2] == ["embed", "pos_embed"] and "unembed" not in names
    assert attention_heads(base)[0].selections.keys() >= {"h.0.attn.c_proj.weight"}


def test_transformer_bridge_reads_split_qkv_and_refuses_its_wrapped_model(tokens):
    """The bridge's forward pass reads the split q/k/v, not GPT-2's fused c_attn: heads
    select the split maps, the fused weight gets no gradient, and the Hugging Face model
    inside the bridge (modified in place) is refused instead of mapped to c_attn."""
    pytest.importorskip("transformer_lens")
    pytest.importorskip("transformers")
    bridge = _float64(_bridge(_gpt2))
    fused = "transformer.h.0._original_component.attn.qkv._original_component.weight"
    split = "transformer.h.0._original_component.attn.q._original_component.weight"
    params = dict(bridge.named_parameters())
    head = _by_name(attention_heads(bridge))["L0H1"].resolve(bridge)
    assert split in head.param_names and fused not in head.param_names
    k = head.param_names.index(split)
    assert torch.equal(head.flat_indices[k], _flat(params[split].shape, _rows(1)))
    loss = _loss_fn(False)(bridge, tokens).mean()
    g_fused, g_split = torch.autograd.grad(loss, [params[fused], params[split]], allow_unused=True)
    assert g_fused is None or torch.count_nonzero(g_fused) == 0
    assert torch.count_nonzero(g_split) > 0
    with pytest.raises(TypeError, match="wrapped by a TransformerLens TransformerBridge"):
        attention_heads(bridge.original_model)


def test_tied_names_count_slots_not_paths():
    """GPT-2's LM head is tied to its embedding (another slot: both are set); a bridge
    reaches one slot through two module paths (set once, else torch's own tying leaves
    the replacement in the model after functional_call)."""
    pytest.importorskip("transformers")
    hf = _gpt2()
    assert tied_names(hf, ["transformer.wte.weight"]) == {
        "transformer.wte.weight": ["lm_head.weight"]
    }
    pytest.importorskip("transformer_lens")
    bridge = _bridge(_gpt2).eval()
    o = "transformer.h.0._original_component.attn.o._original_component.weight"
    assert tied_names(bridge, [o]) == {o: []}
    original = dict(bridge.named_parameters())[o]
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    zeros = {o: torch.zeros_like(original)}
    out = torch.func.functional_call(bridge, zeros, (ids,), tie_weights=False)
    assert not torch.equal(out, bridge(ids))  # the zeros were used ...
    assert dict(bridge.named_parameters())[o] is original  # ... and the model restored
    with torch.no_grad():
        original.zero_()
    torch.testing.assert_close(bridge(ids), out)


def test_user_defined_sets_on_a_plain_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    per_param = parameter_components(model)
    assert [c.name for c in per_param] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert sum(c.resolve(model).dim for c in per_param) == sum(
        p.numel() for p in model.parameters()
    )
    assert [c.name for c in parameter_components(model, r"\.bias$")] == ["0.bias", "2.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        parameter_components(model, "W_Q")
    assert by_parameters("first", ["0.weight", "0.bias"]).resolve(model).dim == 16
    assert by_parameters("w", "0.weight").resolve(model).dim == 12
    assert by_regex("weights", model, r"weight$").resolve(model).dim == 12 + 8
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1:3, 0] = True
    comp = by_mask("two", {"0.weight": mask}, model)
    r = comp.resolve(model)
    assert r.dim == 2 and torch.equal(r.flat_indices[0], torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="does not match the parameter"):
        by_mask("bad", {"0.weight": torch.ones(3, 4, dtype=torch.bool)}, model)
    with pytest.raises(TypeError, match="bool tensor"):
        by_mask("bad", {"0.weight": torch.ones(4, 3)})
    with pytest.raises(ValueError, match="non-empty"):
        by_mask("bad", {})


def test_library_imports_without_model_packages():
    code = (
        "import sys, bayes_susc, bayes_susc.target.architectures as a\n"
        "from bayes_susc.demo.model import AttnOnlyTransformer\n"
        "a.components(AttnOnlyTransformer(generator=0))\n"
        "assert 'transformers' not in sys.modules and 'transformer_lens' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

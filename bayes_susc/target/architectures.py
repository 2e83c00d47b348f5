"""Components of common architectures: attention heads, MLPs, embeddings, unembedding.

Every helper returns :class:`~bayes_susc.target.components.Component` objects whose parameter
names are those of ``model.named_parameters()`` of the model you pass (so they resolve
against it and can go straight into :class:`~bayes_susc.LocalPosterior`). Names:
``L{layer}H{head}`` (attention head), ``L{layer}KV{group}`` (a key/value head shared by a
group of query heads), ``L{layer}MLP``, ``embed``, ``pos_embed``, ``unembed``.

Supported models (the model itself, or any module that contains one):

- :class:`bayes_susc.demo.model.AttnOnlyTransformer` (this package's demo model);
- TransformerLens 3.x ``HookedTransformer`` (including grouped-query models, whose
  shared key/value weights are the parameters ``_W_K``, ``_W_V``, ``_b_K``, ``_b_V``);
- TransformerLens 3.x / 4.x ``TransformerBridge`` around a Hugging Face model (below);
- Hugging Face ``transformers`` GPT-2 (``model_type="gpt2"``: ``GPT2LMHeadModel``,
  ``GPT2Model``, ...), GPT-NeoX / Pythia (``"gpt_neox"``) and the Llama layout
  (``"llama"``, ``"mistral"``, ``"qwen2"``), heads or base models.

Neither ``transformers`` nor ``transformer_lens`` is imported here: models are recognised
by class names and ``config.model_type``, so the library imports without them.

What an attention head owns
---------------------------
Head ``h`` of layer ``l`` owns every weight entry that reaches the layer output only
through that head: its query, key and value projections (weights and biases) and its
rows/columns of the output projection. Parameters that all heads of a layer share (the
output bias; q/k normalization weights, where a model has them) belong to no head. Per
family (``e`` = d_head, ``d`` = d_model, ``n`` = heads, ``j`` = 0, 1, 2 for Q, K, V):

- TransformerLens / AttnOnlyTransformer: index ``[h]`` of ``W_Q W_K W_V b_Q b_K b_V``
  (n, ...) and of ``W_O`` (n, e, d); ``b_O`` shared.
- GPT-2: ``c_attn.weight`` (Conv1D, shape (d, 3d), columns [Q | K | V]): columns
  ``j·d + h·e : j·d + (h+1)·e``, and the same entries of ``c_attn.bias`` (selected by a
  boolean mask); ``c_proj.weight`` (d, d) rows ``h·e:(h+1)·e``; ``c_proj.bias`` shared.
- GPT-NeoX / Pythia: ``query_key_value.weight`` (Linear, shape (3d, d)) rows
  ``3h·e : 3(h+1)·e`` — interleaved per head as ``[q_h | k_h | v_h]``, not in Q, K, V
  thirds — and the same rows of its bias; ``dense.weight`` (d, d) columns
  ``h·e:(h+1)·e``; ``dense.bias`` shared.
- Llama layout: ``q_proj`` rows ``h·e:(h+1)·e`` (weight and bias, if any) and
  ``o_proj`` columns ``h·e:(h+1)·e``; ``k_proj``/``v_proj`` see below; ``o_proj.bias``
  (if any) shared.

(The GPT-NeoX layout is read from ``GPTNeoXAttention.forward``: the fused output is
viewed as ``(..., n, 3e)`` and chunked into q, k, v along the last axis.)

Grouped-query attention (Llama layout with ``num_key_value_heads < num_attention_heads``,
TransformerLens with ``n_key_value_heads``): query head ``h`` reads key/value head
``g = h // group_size`` (``group_size = n_heads / n_kv_heads``; ``repeat_kv`` in HF,
``repeat_interleave`` in TransformerLens). The key/value weights of group ``g`` are then
shared by ``group_size`` query heads, so

- ``attention_heads(model)`` (``shared_kv="exclude"``, default): head ``h`` owns its query
  slice (weights and bias) and its output slice only; the key/value slices of each group
  are the separate components ``kv_heads(model)`` → ``L{l}KV{g}``. Heads, KV heads and
  the shared output bias partition the attention parameters.
- ``attention_heads(model, shared_kv="include")``: head ``h`` additionally owns the
  key/value slices of its group, so heads of one group overlap.

Zeroing the output slice of query head ``h`` makes the loss independent of its query
slice (exactly zero gradient); the key/value slices of its group still get gradient
through the other heads of the group, and become gradient-free only when the output
slices of *all* heads of the group are zero. With one query head per key/value head
(ordinary multi-head attention, ``group_size = 1``) there is no sharing: each head owns
its key/value slices and ``kv_heads`` returns an empty list.

Other components
----------------
- ``mlps``: every parameter of each layer's ``mlp`` submodule (in and out weights and
  biases, gate for gated MLPs), one component ``L{l}MLP`` per layer that has one.
- ``embeddings``: ``embed`` (token embedding) and, where the model learns one,
  ``pos_embed`` (learned positional embedding; rotary models have none).
- ``unembedding``: ``unembed``, the output projection (and its bias, if any). When the
  model ties it to the token embedding (GPT-2's default), ``named_parameters()`` lists
  the matrix once, under the embedding's name, so ``unembed`` and ``embed`` select the
  same matrix: sampling either moves both roles.
- Layer norms belong to no component above; select them by name or regex.
- Any set of entries: ``by_parameters`` (exact names), ``by_regex``, ``by_mask``, and
  ``parameter_components`` (one component per parameter); these work for any
  ``nn.Module``.

Sampling Hugging Face models
----------------------------
All families run under the library's ``functional_call`` + ``vmap`` path with a loss such
as ``F.cross_entropy(model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:],
reduction="none")``. With ``transformers``' default ``attn_implementation="sdpa"`` on
CPU, PyTorch has no vmap batching rule for
``aten::_scaled_dot_product_flash_attention_for_cpu`` and falls back to a loop over
chains (correct, with a "performance drop" ``UserWarning``); build the model with
``attn_implementation="eager"`` to stay fully vectorized.

TransformerLens 4.x and ``TransformerBridge``
--------------------------------------------
TransformerLens 4.0 removes ``HookedTransformer`` (deprecated in 3.x) in favour of
``TransformerBridge``, which wraps an unmodified Hugging Face model
(``bridge.original_model``) and exposes TransformerLens-style hooks over it. Pass the
bridge itself: its components are found through the Hugging Face model it wraps, under
the names ``bridge.named_parameters()`` gives (the Hugging Face names with
``._original_component`` segments), so they go straight into ``LocalPosterior(bridge,
...)`` with a loss on ``bridge(ids)`` (the logits). What a head owns follows from what
the bridge's forward pass reads, which is not always what the Hugging Face model reads:

- Each attention layer of the bridge has linear maps ``q``, ``k``, ``v`` and ``o``
  (``nn.Linear``, or GPT-2's ``Conv1D``). Where the Hugging Face model fuses them
  (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``), the bridge splits the fused
  weight into separate ``q``/``k``/``v`` parameters when it is built, and its forward
  pass reads those; the fused parameter stays in ``named_parameters()`` but no longer
  reaches the loss (zero gradient), so it belongs to no component.
- Head ``h`` owns rows ``h·e:(h+1)·e`` of the ``q``, ``k``, ``v`` weights and biases
  (columns, for ``Conv1D``) and the matching input slice of ``o`` (columns of a
  ``Linear``, rows of a ``Conv1D``); ``o``'s bias is shared. Grouped-query bridges
  (``n_key_value_heads``) split ``k``/``v`` into ``L{l}KV{g}`` exactly as above.
- ``mlps``: every parameter of the block's ``mlp``; ``embeddings``: ``bridge.embed``
  and, where it has parameters, ``bridge.pos_embed``; ``unembedding``: ``bridge.unembed``
  (GPT-2's tied matrix under the embedding's name).

The Hugging Face model inside a bridge is modified in place (bridge components replace
its submodules), so the helpers refuse ``bridge.original_model`` and ask for the bridge:
the Hugging Face layout would point at the fused weights the bridged forward no longer
reads. Tested with TransformerLens 3.9 and 4.3 on GPT-2, GPT-NeoX and Llama bridges
built with ``transformer_lens.model_bridge.sources._bridge_builder.build_bridge_from_module``
(what ``TransformerBridge.boot_transformers`` calls after loading), and on a GPT-2 bridge
after ``enable_compatibility_mode()`` (the same maps with processed weights; its
unembedding is untied from the embedding, so ``unembed`` is then its own matrix).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from bayes_susc.target.components import Component, Selection

__all__ = [
    "SUPPORTED_MODELS",
    "attention_heads",
    "by_mask",
    "by_parameters",
    "by_regex",
    "components",
    "embeddings",
    "kv_heads",
    "mlps",
    "parameter_components",
    "register_architecture",
    "unembedding",
]

# Hugging Face ``config.model_type`` -> (family, attention class name).
_HF_FAMILIES: dict[str, tuple[str, str]] = {
    "gpt2": ("gpt2", "GPT2Attention"),
    "gpt_neox": ("gpt_neox", "GPTNeoXAttention"),
    "llama": ("llama", "LlamaAttention"),
    "mistral": ("llama", "MistralAttention"),
    "qwen2": ("llama", "Qwen2Attention"),
}

SUPPORTED_MODELS = (
    "registered architectures (e.g. the demo's AttnOnlyTransformer); "
    "TransformerLens 3.x HookedTransformer; "
    "TransformerLens 3.x/4.x TransformerBridge (around a Hugging Face model); "
    "Hugging Face transformers models with model_type "
    + ", ".join(repr(k) for k in _HF_FAMILIES)
    + " (e.g. GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM)"
)

Kind = Literal["heads", "kv_heads", "mlps", "embeddings", "unembedding", "all"]
_KINDS = ("heads", "kv_heads", "mlps", "embeddings", "unembedding", "all")
SharedKV = Literal["exclude", "include"]


# ------------------------------------------------------------------- registered adapters
@dataclass(frozen=True)
class _Adapter:
    is_model: Callable[[nn.Module], bool]
    is_attention: Callable[[nn.Module], bool]


# family name -> adapter of a model laid out as a TransformerLens HookedTransformer
_ADAPTERS: dict[str, _Adapter] = {}


def register_architecture(
    family: str,
    *,
    is_model: Callable[[nn.Module], bool],
    is_attention: Callable[[nn.Module], bool],
) -> None:
    """Teach the component helpers a model laid out as TransformerLens lays one out.

    Such a model has ``embed`` (and optionally ``pos_embed``) modules, attention modules
    whose parameters ``W_Q W_K W_V W_O b_Q b_K b_V`` index head ``h`` at ``[h]``, and an
    ``unembed`` module. Architecture adapters call this when their module is imported
    (the demo model does), so this package never imports them.

    Args:
        family: a name for the family, reported in errors; registering it again replaces
            the earlier adapter.
        is_model: True for the model's outermost module.
        is_attention: True for each of its attention modules.
    """
    if not isinstance(family, str) or not family:
        raise ValueError(f"family must be a non-empty string, got {family!r}")
    if not callable(is_model) or not callable(is_attention):
        raise TypeError("is_model and is_attention must be callables taking an nn.Module")
    _ADAPTERS[family] = _Adapter(is_model, is_attention)


def _index_layout(family: str) -> bool:
    """Whether the family keeps heads at an index of W_Q... (TransformerLens layout)."""
    return family == "transformer_lens" or family in _ADAPTERS


# --------------------------------------------------------------------------- layout
@dataclass
class _Layer:
    """Attention and MLP parameters of one layer, by full parameter name."""

    index: int
    heads: list[dict[str, Selection]]  # per query head: q (+ own k/v if unshared) + o
    kv: list[dict[str, Selection]]  # per shared key/value head (group_size > 1), else []
    group_size: int  # query heads per key/value head
    mlp: list[str] = field(default_factory=list)


@dataclass
class _Root:
    family: str  # registered, "transformer_lens", "tl_bridge", "gpt2", "gpt_neox" or "llama"
    module: nn.Module
    names: dict[int, str]  # id(parameter) -> its name in model.named_parameters()
    order: dict[str, int]  # parameter name -> position in model.named_parameters()


def _class_names(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _is_tl(obj: object, class_name: str) -> bool:
    return any(
        c.__name__ == class_name and c.__module__.startswith("transformer_lens")
        for c in type(obj).__mro__
    )


def _find_root(model: nn.Module) -> _Root:
    """The outermost supported model inside ``model`` (``model`` itself, usually)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for _, module in model.named_modules():
        family = next((f for f, a in _ADAPTERS.items() if a.is_model(module)), None)
        if family is not None:
            pass
        elif _is_tl(module, "TransformerBridge"):
            family = "tl_bridge"
        elif _is_tl(module, "HookedTransformer"):
            family = "transformer_lens"
        elif "PreTrainedModel" in _class_names(module):
            if any(_is_tl(m, "GeneralizedComponent") for m in module.modules()):
                raise TypeError(
                    f"this {type(module).__name__} is wrapped by a TransformerLens "
                    "TransformerBridge, which replaced its submodules (the bridged forward "
                    "pass reads split q/k/v weights, not the fused ones of the Hugging Face "
                    "layout); pass the bridge itself"
                )
            model_type = getattr(getattr(module, "config", None), "model_type", None)
            if model_type not in _HF_FAMILIES:
                raise TypeError(
                    f"Hugging Face model {type(module).__name__} (model_type={model_type!r}) "
                    f"is not supported; supported: {SUPPORTED_MODELS}. For other models "
                    "select weights with by_parameters, by_regex or by_mask"
                )
            family = _HF_FAMILIES[model_type][0]
        if family is not None:
            names: dict[int, str] = {}
            for name, p in model.named_parameters():
                names.setdefault(id(p), name)
            order = {name: i for i, name in enumerate(names.values())}
            return _Root(family, module, names, order)
    raise TypeError(
        f"no supported architecture found in {type(model).__name__}; supported: "
        f"{SUPPORTED_MODELS}. For any other nn.Module use parameter_components, "
        "by_parameters, by_regex or by_mask"
    )


def _name(root: _Root, p: torch.Tensor) -> str:
    try:
        return root.names[id(p)]
    except KeyError:
        raise ValueError(
            f"a parameter of shape {tuple(p.shape)} is not among the model's "
            "named_parameters(); pass the whole model"
        ) from None


def _in_model_order(root: _Root, selections: dict[str, Selection]) -> dict[str, Selection]:
    return dict(sorted(selections.items(), key=lambda item: root.order[item[0]]))


def _param(module: nn.Module, attr: str) -> nn.Parameter | None:
    p = getattr(module, attr, None)
    return p if isinstance(p, nn.Parameter) else None


def _check_shape(where: str, p: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(p.shape) != shape:
        raise ValueError(
            f"{where} has shape {tuple(p.shape)}, expected {shape} from the head layout; "
            "the model's attention does not have the layout this helper assumes"
        )


def _attention_modules(root: _Root) -> list[tuple[str, nn.Module]]:
    if root.family in _ADAPTERS:
        match = _ADAPTERS[root.family].is_attention
    elif root.family == "transformer_lens":
        match = lambda m: _is_tl(m, "AbstractAttention")  # noqa: E731
    elif root.family == "tl_bridge":
        match = lambda m: _is_tl(m, "AttentionBridge")  # noqa: E731
    else:
        model_type = root.module.config.model_type
        cls = _HF_FAMILIES[model_type][1]
        match = lambda m: cls in _class_names(m)  # noqa: E731
    return [(n, m) for n, m in root.module.named_modules() if match(m)]


def _layers(model: nn.Module, shared_kv: SharedKV = "exclude") -> list[_Layer]:
    if shared_kv not in ("exclude", "include"):
        raise ValueError(f"shared_kv must be 'exclude' or 'include', got {shared_kv!r}")
    root = _find_root(model)
    blocks = dict(root.module.named_modules())
    build = (
        _per_head_index_layout
        if _index_layout(root.family)
        else {
            "gpt2": _gpt2_layout,
            "gpt_neox": _neox_layout,
            "llama": _llama_layout,
            "tl_bridge": _bridge_layout,
        }[root.family]
    )
    layers = []
    for count, (path, attn) in enumerate(_attention_modules(root)):
        parent_path, _, _ = path.rpartition(".")
        # A bridge reaches a block's attention through the wrapped Hugging Face block:
        # "blocks.3._original_component.attn" is layer 3.
        last = parent_path.replace("._original_component", "").rpartition(".")[2]
        index = int(last) if last.isdigit() else count
        heads, kv, group = build(root, attn, path)
        if group > 1 and shared_kv == "include":
            heads = [{**sel, **kv[h // group]} for h, sel in enumerate(heads)]
        # Parameters in model order (e.g. W_Q, W_K, W_V, W_O, b_Q, ...), as named_parameters.
        heads = [_in_model_order(root, sel) for sel in heads]
        kv = [_in_model_order(root, sel) for sel in kv]
        mlp = getattr(blocks.get(parent_path), "mlp", None) if parent_path else None
        mlp_names = [_name(root, p) for p in mlp.parameters()] if isinstance(mlp, nn.Module) else []
        layers.append(_Layer(index, heads, kv, group, mlp_names))
    if not layers:
        raise ValueError(f"found no attention layer in {type(root.module).__name__}")
    if len({layer.index for layer in layers}) != len(layers):
        raise ValueError(
            "several attention modules map to one layer (cross-attention?); "
            "only decoder self-attention is supported"
        )
    return layers


def _groups(n_heads: int, n_kv: int, where: str) -> int:
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"{where}: {n_heads} query heads cannot share {n_kv} key/value heads")
    return n_heads // n_kv


def _per_head_index_layout(root: _Root, attn: nn.Module, path: str):
    """TransformerLens layout: head ``h`` is index ``[h]`` of W_Q/W_K/W_V/W_O/b_Q/b_K/b_V."""
    w_q = _param(attn, "W_Q")
    if w_q is None:
        raise ValueError(f"{path}: no W_Q parameter (quantized TransformerLens models?)")
    n_heads = w_q.shape[0]
    names = {a: _name(root, p) for a, p in attn.named_parameters(recurse=False)}
    if "_W_K" in names:  # TransformerLens GroupedQueryAttention
        n_kv = _param(attn, "_W_K").shape[0]
        kv_attrs = ("_W_K", "_W_V", "_b_K", "_b_V")
    else:
        n_kv = n_heads
        kv_attrs = ("W_K", "W_V", "b_K", "b_V")
    group = _groups(n_heads, n_kv, path)
    q_attrs = [a for a in ("W_Q", "b_Q", "W_O") if a in names]
    kv_attrs = [a for a in kv_attrs if a in names]
    for a in q_attrs:
        if _param(attn, a).shape[0] != n_heads:
            raise ValueError(f"{path}.{a}: leading dim {_param(attn, a).shape[0]} != {n_heads}")
    kv = [{names[a]: (g,) for a in kv_attrs} for g in range(n_kv)]
    heads = [{names[a]: (h,) for a in q_attrs} for h in range(n_heads)]
    if group == 1:
        heads = [{**heads[h], **kv[h]} for h in range(n_heads)]
        kv = []
    return heads, kv, group


def _gpt2_layout(root: _Root, attn: nn.Module, path: str):
    """GPT-2: fused Conv1D ``c_attn`` (d, 3d), columns [Q | K | V]; ``c_proj`` (d, d)."""
    if getattr(attn, "is_cross_attention", False):
        raise ValueError(f"{path}: GPT-2 cross-attention is not supported")
    n, e = attn.num_heads, attn.head_dim
    inner = n * e  # = d_model, unless heads were pruned
    w, b = attn.c_attn.weight, _param(attn.c_attn, "bias")
    w_o = attn.c_proj.weight
    d = w.shape[0]
    _check_shape(f"{path}.c_attn.weight", w, (d, 3 * inner))
    _check_shape(f"{path}.c_proj.weight", w_o, (inner, d))
    heads = []
    for h in range(n):
        cols = torch.zeros(3 * inner, dtype=torch.bool, device=w.device)
        for j in range(3):
            cols[j * inner + h * e : j * inner + (h + 1) * e] = True
        # A stride-0 view: one row of storage however large d is.
        sel: dict[str, Selection] = {_name(root, w): cols.expand(d, 3 * inner)}
        if b is not None:
            sel[_name(root, b)] = cols
        sel[_name(root, w_o)] = (slice(h * e, (h + 1) * e),)
        heads.append(sel)
    return heads, [], 1


def _neox_layout(root: _Root, attn: nn.Module, path: str):
    """GPT-NeoX: fused Linear ``query_key_value`` (3d, d), rows per head [q_h, k_h, v_h]."""
    e = attn.head_size
    n = attn.config.num_attention_heads
    w, b = attn.query_key_value.weight, _param(attn.query_key_value, "bias")
    w_o = attn.dense.weight
    d = w.shape[1]
    _check_shape(f"{path}.query_key_value.weight", w, (3 * n * e, d))
    _check_shape(f"{path}.dense.weight", w_o, (d, n * e))
    heads = []
    for h in range(n):
        rows = slice(3 * h * e, 3 * (h + 1) * e)
        sel: dict[str, Selection] = {_name(root, w): (rows,)}
        if b is not None:
            sel[_name(root, b)] = (rows,)
        sel[_name(root, w_o)] = (slice(None), slice(h * e, (h + 1) * e))
        heads.append(sel)
    return heads, [], 1


def _llama_layout(root: _Root, attn: nn.Module, path: str):
    """Llama layout: separate q/k/v/o projections, grouped-query key/value heads."""
    e = attn.head_dim
    n = attn.config.num_attention_heads
    n_kv = getattr(attn.config, "num_key_value_heads", None) or n
    group = _groups(n, n_kv, path)
    proj = {k: getattr(attn, f"{k}_proj") for k in "qkvo"}
    d = proj["q"].weight.shape[1]
    _check_shape(f"{path}.q_proj.weight", proj["q"].weight, (n * e, d))
    _check_shape(f"{path}.k_proj.weight", proj["k"].weight, (n_kv * e, d))
    _check_shape(f"{path}.v_proj.weight", proj["v"].weight, (n_kv * e, d))
    _check_shape(f"{path}.o_proj.weight", proj["o"].weight, (d, n * e))

    def rows(keys: str, i: int) -> dict[str, Selection]:
        out: dict[str, Selection] = {}
        for k in keys:
            for p in (proj[k].weight, _param(proj[k], "bias")):
                if p is not None:
                    out[_name(root, p)] = (slice(i * e, (i + 1) * e),)
        return out

    o_name = _name(root, proj["o"].weight)
    heads = [{**rows("q", h), o_name: (slice(None), slice(h * e, (h + 1) * e))} for h in range(n)]
    kv = [rows("kv", g) for g in range(n_kv)]
    if group == 1:
        heads = [{**heads[h], **kv[h]} for h in range(n)]
        kv = []
    return heads, kv, group


def _bridge_linear(
    attn: nn.Module, key: str, path: str
) -> tuple[torch.Tensor, nn.Parameter | None, bool]:
    """Weight, bias and ``Conv1D``-ness (weight stored (in, out)) of a bridge's ``q`` /
    ``k`` / ``v`` / ``o`` map: the module its ``LinearBridge`` wraps."""
    sub = getattr(attn, key, None)
    inner = getattr(sub, "_original_component", sub)
    w = _param(inner, "weight") if isinstance(inner, nn.Module) else None
    if w is None or w.ndim != 2:
        raise ValueError(
            f"{path}: no {key!r} linear map with a 2-d weight; this TransformerBridge "
            "attention does not have the q/k/v/o layout the helpers assume"
        )
    return w, _param(inner, "bias"), "Conv1D" in _class_names(inner)


def _bridge_layout(root: _Root, attn: nn.Module, path: str):
    """TransformerBridge: the split ``q``/``k``/``v`` and ``o`` maps its forward reads."""
    cfg = getattr(attn, "config", None)
    n, e = getattr(cfg, "n_heads", None), getattr(cfg, "d_head", None)
    if not (isinstance(n, int) and isinstance(e, int)):
        raise ValueError(f"{path}: the bridge config gives no n_heads / d_head")
    maps = {k: _bridge_linear(attn, k, path) for k in "qkvo"}
    w_q, _, conv = maps["q"]
    d = w_q.shape[0] if conv else w_q.shape[1]
    kv_width = maps["k"][0].shape[1 if maps["k"][2] else 0]
    if kv_width % e:
        raise ValueError(f"{path}: k projects to {kv_width} features, not a multiple of {e}")
    n_kv = kv_width // e
    group = _groups(n, n_kv, path)
    for k, heads_here in (("q", n), ("k", n_kv), ("v", n_kv)):
        w, b, is_conv = maps[k]
        shape = (d, heads_here * e) if is_conv else (heads_here * e, d)
        _check_shape(f"{path}.{k}.weight", w, shape)
        if b is not None:
            _check_shape(f"{path}.{k}.bias", b, (heads_here * e,))
    w_o, _, o_conv = maps["o"]
    _check_shape(f"{path}.o.weight", w_o, (n * e, d) if o_conv else (d, n * e))

    def out_features(keys: str, i: int) -> dict[str, Selection]:
        sl = slice(i * e, (i + 1) * e)
        out: dict[str, Selection] = {}
        for k in keys:
            w, b, is_conv = maps[k]
            out[_name(root, w)] = (slice(None), sl) if is_conv else (sl,)
            if b is not None:
                out[_name(root, b)] = (sl,)
        return out

    def o_slice(h: int) -> Selection:
        sl = slice(h * e, (h + 1) * e)
        return (sl,) if o_conv else (slice(None), sl)

    o_name = _name(root, w_o)
    heads = [{**out_features("q", h), o_name: o_slice(h)} for h in range(n)]
    kv = [out_features("kv", g) for g in range(n_kv)]
    if group == 1:
        heads = [{**heads[h], **kv[h]} for h in range(n)]
        kv = []
    return heads, kv, group


# ------------------------------------------------------------------------ public API
def attention_heads(model: nn.Module, *, shared_kv: SharedKV = "exclude") -> list[Component]:
    """One component ``L{layer}H{head}`` per attention (query) head, layer by layer.

    A head owns its query/key/value slices (weights and biases) and its slice of the
    output projection; the shared output bias belongs to no head (see the module
    docstring for each family's layout).

    Args:
        model: a supported model (see :data:`SUPPORTED_MODELS`) or a module containing one.
        shared_kv: for grouped-query attention only: ``"exclude"`` (default) leaves the
            key/value slices a group of heads shares to :func:`kv_heads`, so components
            are disjoint; ``"include"`` gives each head its group's key/value slices too
            (heads of one group then overlap). No effect without grouped-query attention.
    """
    return [
        Component(f"L{layer.index}H{h}", sel)
        for layer in _layers(model, shared_kv)
        for h, sel in enumerate(layer.heads)
    ]


def kv_heads(model: nn.Module) -> list[Component]:
    """One component ``L{layer}KV{group}`` per key/value head shared by several query heads.

    Its weight entries are the key and value slices (weights and biases) of the group:
    query heads ``group·size … (group+1)·size − 1`` read them. Empty for models without
    grouped-query attention (there every head owns its own key/value slices).
    """
    return [
        Component(f"L{layer.index}KV{g}", sel)
        for layer in _layers(model)
        for g, sel in enumerate(layer.kv)
    ]


def mlps(model: nn.Module) -> list[Component]:
    """One component ``L{layer}MLP`` per layer with an MLP: all parameters of its ``mlp``.

    Empty for attention-only models.
    """
    return [
        Component.from_parameters(f"L{layer.index}MLP", layer.mlp)
        for layer in _layers(model)
        if layer.mlp
    ]


def embeddings(model: nn.Module) -> list[Component]:
    """``embed`` (token embedding) and, if the model learns one, ``pos_embed``."""
    root = _find_root(model)
    m = root.module
    if _index_layout(root.family) or root.family == "tl_bridge":
        token, pos = m.embed, getattr(m, "pos_embed", None)
    else:
        token = m.get_input_embeddings()
        pos = getattr(m.base_model, "wpe", None) if root.family == "gpt2" else None
    out = []
    for name, module in (("embed", token), ("pos_embed", pos)):
        if isinstance(module, nn.Module):
            names = [_name(root, p) for p in module.parameters()]
            if names:
                out.append(Component.from_parameters(name, names))
    return out


def unembedding(model: nn.Module) -> Component:
    """``unembed``: the output projection to logits (and its bias, if any).

    If the model ties it to the token embedding, this is the embedding's matrix (under
    the embedding's parameter name). Raises ``ValueError`` for a model without one (a
    Hugging Face base model such as ``GPT2Model``).
    """
    root = _find_root(model)
    m = root.module
    if _index_layout(root.family) or root.family == "tl_bridge":
        head = m.unembed
    else:
        head = m.get_output_embeddings()
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        raise ValueError(
            f"{type(m).__name__} has no unembedding (a base model without an LM head?); "
            "use e.g. GPT2LMHeadModel / GPTNeoXForCausalLM / LlamaForCausalLM"
        )
    return Component.from_parameters("unembed", [_name(root, p) for p in head.parameters()])


def components(
    model: nn.Module,
    kind: Kind | Sequence[Kind] = "all",
    *,
    shared_kv: SharedKV = "exclude",
) -> list[Component]:
    """Components of the given kind(s).

    Args:
        model: a supported model or a module containing one.
        kind: ``"heads"``, ``"kv_heads"``, ``"mlps"``, ``"embeddings"``, ``"unembedding"``
            or ``"all"``, or a sequence of these. ``"all"`` lists every component the model
            has in forward order: ``embed``, ``pos_embed``, then per layer its heads, KV
            heads and MLP, then ``unembed`` (omitted for models without one).
        shared_kv: how heads treat shared key/value weights; see :func:`attention_heads`.
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        if k not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS} or a list of them, got {k!r}")
    if "all" in kinds:
        out = embeddings(model)
        for layer in _layers(model, shared_kv):
            i = layer.index
            out += [Component(f"L{i}H{h}", sel) for h, sel in enumerate(layer.heads)]
            out += [Component(f"L{i}KV{g}", sel) for g, sel in enumerate(layer.kv)]
            if layer.mlp:
                out.append(Component.from_parameters(f"L{i}MLP", layer.mlp))
        try:
            out.append(unembedding(model))
        except ValueError:
            pass
        return out
    out = []
    for k in kinds:
        if k == "heads":
            out += attention_heads(model, shared_kv=shared_kv)
        elif k == "kv_heads":
            out += kv_heads(model)
        elif k == "mlps":
            out += mlps(model)
        elif k == "embeddings":
            out += embeddings(model)
        else:
            out.append(unembedding(model))
    return out


# ------------------------------------------------------------ any nn.Module, by hand
def parameter_components(model: nn.Module, pattern: str | None = None) -> list[Component]:
    """One component per parameter (named after it), optionally only names matching ``pattern``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    regex = re.compile(pattern) if pattern is not None else None
    out = [
        Component.from_parameters(name, [name])
        for name, _ in model.named_parameters()
        if regex is None or regex.search(name)
    ]
    if not out:
        raise ValueError(
            f"pattern {pattern!r} matches no parameter of the model"
            if pattern is not None
            else "the model has no parameters"
        )
    return out


def by_parameters(name: str, parameter_names: Iterable[str]) -> Component:
    """Component freeing whole parameters given by exact name."""
    names = [parameter_names] if isinstance(parameter_names, str) else list(parameter_names)
    return Component.from_parameters(name, names)


def by_regex(name: str, model: nn.Module, pattern: str) -> Component:
    """Component freeing every whole parameter whose name matches ``pattern`` (``re.search``)."""
    return Component.from_regex(name, model, pattern)


def by_mask(
    name: str, masks: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> Component:
    """Component freeing the ``True`` entries of boolean masks (parameter name -> mask).

    With ``model`` given, the masks are checked against it now (shape, dtype, names)
    instead of when the component is first resolved.
    """
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError(f"masks must be a non-empty dict of parameter name -> mask, got {masks!r}")
    for pname, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask for {pname!r} must be a bool tensor, got "
                f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
    component = Component(name, dict(masks))
    if model is not None:
        component.resolve(model)
    return component

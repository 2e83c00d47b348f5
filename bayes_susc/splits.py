"""Frozen-prefix splits: compute what no replica can change once, share it with all.

A component's local posterior moves only its own entries. Everything the forward pass
computes *before* those entries are used — the layers below an attention head, and the
other heads of its layer — is the same for every chain and every draw; only the
minibatch changes it. And everything *after* them uses frozen weights only, so the
replicas (chains) can run it as one larger batch instead of one model call each. A
:class:`ForwardSplit` cuts the model's forward pass accordingly:

- ``prefix(*args, **kwargs)``: the frozen part, computed once per batch at w* (without
  autograd) from the model's call arguments; the result is cached per batch;
- ``suffix(params, cached)``: the rest for all replicas at once. ``params`` maps each
  of the component's parameter names to its replica values, shape
  ``(replicas, *parameter shape)``; the result is what ``model(*args, **kwargs)``
  returns, with a leading replica dimension (e.g. logits ``(replicas, batch, pos,
  vocab)``). It must be differentiable in ``params``.

:class:`bayes_susc.posterior.LocalPosterior` finds a split for its (model, component)
with :func:`find_split`, checks at construction that it reproduces the plain per-item
losses at w* on a training batch (within float tolerance), and otherwise warns and runs
the plain forward. The loss function itself still runs per replica (under ``vmap``, on
the replica's outputs), so any ``loss_fn`` that calls the model once works. The draws
are the same either way up to float rounding (``tests/test_splits.py``); only the work
per step differs.

Built in: a single attention head (its slices of ``W_Q``, ``W_K``, ``W_V``, ``W_O``,
``b_Q``, ``b_K``, ``b_V``, any subset of their entries) of the package's
:class:`~bayes_susc.models.attn_only.AttnOnlyTransformer` and of TransformerLens 3.x
``HookedTransformer`` models with standard (learned absolute) positional embeddings.
Users add their own with :func:`register_split`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayes_susc.components import ResolvedComponent

__all__ = [
    "ForwardSplit",
    "SplitFactory",
    "find_split",
    "head_of",
    "register_split",
    "unregister_split",
]

_HEAD_PARAM = re.compile(r"^(?P<prefix>.*?)blocks\.(?P<layer>\d+)\.attn\.(?P<w>W_[QKVO]|b_[QKV])$")


class ForwardSplit:
    """Base class of a frozen-prefix split of a model's forward pass (see module doc).

    Attributes:
        name: short label recorded in run metadata (e.g. ``"attn_only_head"``).
    """

    name = "split"

    def prefix(self, *args: Any, **kwargs: Any) -> Any:
        """Frozen part from the model's call arguments, at w*; called without autograd."""
        raise NotImplementedError

    def suffix(self, params: Mapping[str, Tensor], cached: Any) -> Any:
        """The model's output for every replica, leading dimension ``replicas``, from
        ``cached`` (the prefix) and the component's replica weights ``params``
        (name -> ``(replicas, *shape)``)."""
        raise NotImplementedError


SplitFactory = Callable[[nn.Module, ResolvedComponent], "ForwardSplit | None"]
_FACTORIES: list[SplitFactory] = []


def register_split(factory: SplitFactory) -> SplitFactory:
    """Add ``factory(model, component) -> ForwardSplit | None`` to the split search.

    Factories registered later are tried first; returns ``factory`` (usable as a
    decorator).
    """
    if not callable(factory):
        raise TypeError(f"factory must be callable as factory(model, component), got {factory!r}")
    _FACTORIES.insert(0, factory)
    return factory


def unregister_split(factory: SplitFactory) -> None:
    """Remove a factory added by :func:`register_split`."""
    try:
        _FACTORIES.remove(factory)
    except ValueError:
        raise ValueError(f"{factory!r} is not a registered split factory") from None


def find_split(model: nn.Module, component: ResolvedComponent) -> ForwardSplit | None:
    """The first registered split that applies to ``component`` of ``model``, or None."""
    for factory in _FACTORIES:
        split = factory(model, component)
        if split is not None:
            return split
    return None


def head_of(component: ResolvedComponent) -> tuple[str, int, int] | None:
    """``(prefix, layer, head)`` when every free entry of ``component`` lies in one
    attention head's slices of ``{prefix}blocks.{layer}.attn.{W_Q,W_K,W_V,W_O,b_Q,b_K,b_V}``
    (TransformerLens layout: head index first), else None."""
    found: set[tuple[str, int, int]] = set()
    for pname, idx, shape in zip(component.param_names, component.flat_indices, component.shapes):
        m = _HEAD_PARAM.match(pname)
        if m is None or idx.numel() == 0 or len(shape) < 2:
            return None
        per_head = math.prod(shape[1:])
        heads = torch.unique(idx // per_head)
        if heads.numel() != 1:
            return None
        found.add((m["prefix"], int(m["layer"]), int(heads)))
    return found.pop() if len(found) == 1 else None


def _head_weight(
    params: Mapping[str, Tensor], frozen: Mapping[str, Tensor], name: str, head: int
) -> Tensor:
    """Head ``head``'s slice of weight ``name`` per replica: from ``params``
    (``(replicas, n_heads, ...)``) when the component frees it, else the frozen slice
    with a replica dimension of 1 (broadcast)."""
    if name in params:
        return params[name][:, head]
    return frozen[name][head].unsqueeze(0)


def _replica_head_output(
    x: Tensor,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor],
    prefix: str,
    head: int,
    scale: float,
) -> Tensor:
    """One head's causal attention output for every replica.

    x (batch, pos, d_model) shared by all replicas; the head's weights per replica
    (``W_Q/W_K/W_V`` (R, d_model, d_head), ``b_*`` (R, d_head), ``W_O`` (R, d_head,
    d_model), R = replicas or 1); ``scale`` multiplies q·k -> (R, batch, pos, d_model).
    """

    def w(name: str) -> Tensor:
        return _head_weight(params, frozen, prefix + name, head)

    q = torch.einsum("bpd,rde->rbpe", x, w("W_Q")) + w("b_Q")[:, None, None, :]
    k = torch.einsum("bpd,rde->rbpe", x, w("W_K")) + w("b_K")[:, None, None, :]
    v = torch.einsum("bpd,rde->rbpe", x, w("W_V")) + w("b_V")[:, None, None, :]
    replicas = max(q.shape[0], k.shape[0], v.shape[0])
    shape = (replicas,) + q.shape[1:]
    z = F.scaled_dot_product_attention(
        q.expand(shape), k.expand(shape), v.expand(shape), is_causal=True, scale=scale
    )
    return torch.einsum("rbpe,red->rbpd", z, w("W_O"))


def _others_output(z: Tensor, W_O: Tensor, b_O: Tensor, head: int) -> Tensor:
    """Attention output of every head but ``head``, plus the output bias.

    z (batch, pos, n_heads, d_head), W_O (n_heads, d_head, d_model) -> (batch, pos, d_model).
    """
    keep = torch.ones(z.shape[-2], dtype=z.dtype, device=z.device)
    keep[head] = 0
    return torch.einsum("bphe,hed->bpd", z * keep[:, None], W_O) + b_O


def _fold(t: Tensor) -> Tensor:
    """(replicas, batch, ...) -> (replicas * batch, ...): frozen layers see one batch."""
    return t.reshape((-1,) + t.shape[2:])


class AttnOnlyHeadSplit(ForwardSplit):
    """One head of :class:`~bayes_susc.models.attn_only.AttnOnlyTransformer`.

    The prefix holds the layer's normalized input and the residual stream plus every
    other head's output; the suffix adds each replica's head output and runs the later
    layers on all replicas as one batch (fused causal attention).
    """

    name = "attn_only_head"

    def __init__(self, model: nn.Module, layer: int, head: int) -> None:
        self.model, self.layer, self.head = model, layer, head
        self.prefix_name = f"blocks.{layer}.attn."
        self.frozen = {
            self.prefix_name + n: p.detach() for n, p in model.blocks[layer].attn.named_parameters()
        }
        fused = [(b.ln1, _FusedAttention(b.attn, b.attn.scale)) for b in model.blocks]
        self.earlier, self.own, self.later = fused[:layer], fused[layer], fused[layer + 1 :]
        self.W_U = model.unembed.W_U.detach()
        self.b_U = model.unembed.b_U.detach()

    def prefix(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        resid = self.model.embed_tokens(tokens)
        for ln1, attention in self.earlier:
            resid = resid + attention(ln1(resid))
        ln1, attention = self.own
        x = ln1(resid)
        attn = self.model.blocks[self.layer].attn
        return x, resid + _others_output(attention.z(x), attn.W_O, attn.b_O, self.head)

    def suffix(self, params: Mapping[str, Tensor], cached: tuple[Tensor, Tensor]) -> Tensor:
        x, partial = cached
        scale = self.model.blocks[self.layer].attn.scale
        out = _replica_head_output(x, params, self.frozen, self.prefix_name, self.head, scale)
        resid = _fold(partial + out)
        for ln1, attention in self.later:
            resid = resid + attention(ln1(resid))
        final = self.model.ln_final(resid)
        logits = torch.addmm(self.b_U, final.reshape(-1, final.shape[-1]), self.W_U)
        return logits.reshape(out.shape[:2] + resid.shape[1:2] + logits.shape[-1:])


class _FusedAttention:
    """A frozen causal attention layer with per-head weights (``W_Q/W_K/W_V`` (n, d, e),
    ``W_O`` (n, e, d), biases ``b_Q/b_K/b_V`` (n, e), ``b_O`` (d,): the package's model
    and TransformerLens) as three kernels: fused Q/K/V projection, fused causal attention
    (no (pos × pos) score tensor in memory), output projection. ``scale`` multiplies q·k.

    ``(x)`` with x (batch, pos, d_model) -> the layer's output (batch, pos, d_model).
    """

    def __init__(self, attn: nn.Module, scale: float) -> None:
        n, d, e = attn.W_Q.shape
        self.shape = (3, n, e)
        self.scale = scale
        weights = torch.cat([attn.W_Q, attn.W_K, attn.W_V]).detach()  # (3n, d, e)
        self.W_qkv = weights.permute(1, 0, 2).reshape(d, 3 * n * e)
        self.b_qkv = torch.cat([attn.b_Q, attn.b_K, attn.b_V]).detach().reshape(-1)
        self.W_O = attn.W_O.detach().reshape(n * e, d)
        self.b_O = attn.b_O.detach()

    def z(self, x: Tensor) -> Tensor:
        """Every head's attention-weighted values: x (b, p, d) -> z (b, p, n, e)."""
        b, p, d = x.shape
        qkv = torch.addmm(self.b_qkv, x.reshape(b * p, d), self.W_qkv)
        q, k, v = qkv.reshape((b, p) + self.shape).permute(2, 0, 3, 1, 4)  # 3 x (b, n, p, e)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return z.transpose(1, 2)

    def __call__(self, x: Tensor) -> Tensor:
        b, p, d = x.shape
        z = self.z(x).reshape(b * p, -1)
        return torch.addmm(self.b_O, z, self.W_O).reshape(b, p, d)


def _attn_only_factory(model: nn.Module, component: ResolvedComponent) -> ForwardSplit | None:
    from bayes_susc.models.attn_only import AttnOnlyTransformer

    where = head_of(component)
    if not isinstance(model, AttnOnlyTransformer) or where is None or where[0]:
        return None
    return AttnOnlyHeadSplit(model, where[1], where[2])


def _fused_layer_norm(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """A frozen TransformerLens ``LayerNorm`` / ``LayerNormPre`` as one fused kernel
    (theirs is five elementwise passes); any other module is returned as it is.
    x (..., d_model) -> (..., d_model)."""
    kind = type(module).__name__
    if kind == "LayerNorm" and module.cfg.dtype in (torch.float32, torch.float64):
        w, b, eps = module.w.detach(), module.b.detach(), module.eps
        return lambda x: F.layer_norm(x, w.shape, w, b, eps)
    if kind == "LayerNormPre" and module.cfg.dtype in (torch.float32, torch.float64):
        eps = module.eps
        return lambda x: F.layer_norm(x, x.shape[-1:], None, None, eps)
    return module


class TransformerLensHeadSplit(ForwardSplit):
    """One head of a TransformerLens 3.x ``HookedTransformer`` (pre-norm blocks, learned
    absolute positions, no rotary/ALiBi, no grouped keys).

    The prefix runs the blocks below ``layer`` and every head of block ``layer`` (their
    attention fused), and keeps the residual plus the other heads' output; the suffix
    adds each replica's head output, and runs the block's MLP (if any) and the later
    blocks (their attention fused) on all replicas as one batch.
    """

    name = "transformer_lens_head"

    def __init__(self, model: nn.Module, layer: int, head: int) -> None:
        self.model, self.layer, self.head = model, layer, head
        self.prefix_name = f"blocks.{layer}.attn."
        self.frozen = {
            self.prefix_name + n: p.detach() for n, p in model.blocks[layer].attn.named_parameters()
        }
        # Later blocks' attention fused (TransformerLens materializes and masks the
        # scores tensor in several passes; the replicas make it 4x larger still).
        fused = [
            (_fused_layer_norm(b.ln1), _FusedAttention(b.attn, 1.0 / b.attn.attn_scale))
            for b in model.blocks
        ]
        self.earlier, self.own, self.later = fused[:layer], fused[layer], fused[layer + 1 :]
        self.ln_final = _fused_layer_norm(model.ln_final)

    def prefix(self, tokens: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if kwargs:
            raise TypeError(f"unsupported call arguments {sorted(kwargs)}")
        model = self.model
        resid = model.embed(tokens) + model.pos_embed(tokens)
        for block, (ln1, attention) in zip(model.blocks, self.earlier):
            resid = resid + attention(ln1(resid))
            if not model.cfg.attn_only:
                resid = resid + block.apply_mlp(block.ln2(resid))
        ln1, attention = self.own
        x = ln1(resid)
        attn = model.blocks[self.layer].attn
        return x, resid + _others_output(attention.z(x), attn.W_O, attn.b_O, self.head)

    def suffix(self, params: Mapping[str, Tensor], cached: tuple[Tensor, Tensor]) -> Tensor:
        x, partial = cached
        model = self.model
        block = model.blocks[self.layer]
        scale = 1.0 / block.attn.attn_scale
        out = _replica_head_output(x, params, self.frozen, self.prefix_name, self.head, scale)
        resid = _fold(partial + out)
        if not model.cfg.attn_only:
            resid = resid + block.apply_mlp(block.ln2(resid))
        for later, (ln1, attention) in zip(model.blocks[self.layer + 1 :], self.later):
            resid = resid + attention(ln1(resid))
            if not model.cfg.attn_only:
                resid = resid + later.apply_mlp(later.ln2(resid))
        logits = model.unembed(self.ln_final(resid))
        return logits.reshape(out.shape[:2] + logits.shape[1:])


def _transformer_lens_factory(
    model: nn.Module, component: ResolvedComponent
) -> ForwardSplit | None:
    if not any(c.__name__ == "HookedTransformer" for c in type(model).__mro__):
        return None
    where = head_of(component)
    cfg = getattr(model, "cfg", None)
    if where is None or where[0] or cfg is None:
        return None
    return TransformerLensHeadSplit(model, where[1], where[2]) if _standard_tl(cfg) else None


def _standard_tl(cfg: Any) -> bool:
    """A pre-norm causal TransformerLens config with learned absolute positions and
    one key/value per head (what the fused code paths reproduce)."""
    return (
        cfg.positional_embedding_type == "standard"
        and not cfg.parallel_attn_mlp
        and not getattr(cfg, "use_normalization_before_and_after", False)
        and getattr(cfg, "n_key_value_heads", None) in (None, cfg.n_heads)
        and not getattr(cfg, "use_split_qkv_input", False)
        and not getattr(cfg, "use_attn_in", False)
        and getattr(cfg, "attention_dir", "causal") == "causal"
    )


class TransformerLensReplicaForward(ForwardSplit):
    """Any component of an attention-only TransformerLens ``HookedTransformer`` (standard
    positions, LayerNorm or LayerNormPre): the whole forward pass for all replicas at
    once, each with its own copy of the component's weights (frozen weights broadcast),
    attention fused. Nothing is shared before the component (the prefix is the tokens),
    but TransformerLens's forward under ``vmap`` materializes and masks every
    (pos × pos) score tensor per replica, which this avoids — the path an unrestricted
    run ("full") takes.
    """

    name = "transformer_lens_replicas"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cfg = model.cfg
        self.frozen = {n: p.detach() for n, p in model.named_parameters()}

    def prefix(self, tokens: Tensor, **kwargs: Any) -> Tensor:
        if kwargs:
            raise TypeError(f"unsupported call arguments {sorted(kwargs)}")
        return tokens

    def _w(self, params: Mapping[str, Tensor], name: str) -> Tensor:
        """Weight ``name`` per replica, (R or 1, *shape)."""
        return params[name] if name in params else self.frozen[name].unsqueeze(0)

    def _norm(self, params: Mapping[str, Tensor], prefix: str, x: Tensor) -> Tensor:
        """x (R, b, p, d) through the LayerNorm named ``prefix`` (per-replica affine)."""
        out = F.layer_norm(x, x.shape[-1:], None, None, self.cfg.eps)
        if prefix + "w" in self.frozen:
            w, b = self._w(params, prefix + "w"), self._w(params, prefix + "b")
            out = out * w[:, None, None, :] + b[:, None, None, :]
        return out

    def suffix(self, params: Mapping[str, Tensor], cached: Tensor) -> Tensor:
        tokens = cached
        replicas = next(iter(params.values())).shape[0]
        b, p = tokens.shape
        resid = (
            self._w(params, "embed.W_E")[:, tokens]
            + self._w(params, "pos_embed.W_pos")[:, None, :p]
        )
        resid = resid.expand((replicas,) + resid.shape[1:])
        for layer, block in enumerate(self.model.blocks):
            pre = f"blocks.{layer}."
            x = self._norm(params, pre + "ln1.", resid)

            def proj(w: str, bias: str, x: Tensor = x, pre: str = pre) -> Tensor:
                weight, offset = self._w(params, pre + w), self._w(params, pre + bias)
                out = torch.einsum("rbpd,rhde->rbhpe", x, weight)
                return (out + offset[:, None, :, None, :]).expand((replicas,) + out.shape[1:])

            q = proj("attn.W_Q", "attn.b_Q")
            k = proj("attn.W_K", "attn.b_K")
            v = proj("attn.W_V", "attn.b_V")
            n, e = q.shape[2], q.shape[4]
            z = F.scaled_dot_product_attention(
                q.reshape(-1, n, p, e),
                k.reshape(-1, n, p, e),
                v.reshape(-1, n, p, e),
                is_causal=True,
                scale=1.0 / block.attn.attn_scale,
            ).reshape(replicas, b, n, p, e)
            out = torch.einsum("rbhpe,rhed->rbpd", z, self._w(params, pre + "attn.W_O"))
            resid = resid + out + self._w(params, pre + "attn.b_O")[:, None, None, :]
        x = self._norm(params, "ln_final.", resid)
        logits = torch.einsum("rbpd,rdv->rbpv", x, self._w(params, "unembed.W_U"))
        return logits + self._w(params, "unembed.b_U")[:, None, None, :]


def _transformer_lens_replicas_factory(
    model: nn.Module, component: ResolvedComponent
) -> ForwardSplit | None:
    if not any(c.__name__ == "HookedTransformer" for c in type(model).__mro__):
        return None
    cfg = getattr(model, "cfg", None)
    if cfg is None or not cfg.attn_only or not _standard_tl(cfg):
        return None
    if getattr(cfg, "normalization_type", None) not in ("LN", "LNPre"):
        return None
    return TransformerLensReplicaForward(model)


# Tried last-registered first: single heads (with a shared prefix) before whole replicas.
register_split(_transformer_lens_replicas_factory)
register_split(_transformer_lens_factory)
register_split(_attn_only_factory)

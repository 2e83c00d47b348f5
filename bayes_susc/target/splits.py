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

:class:`bayes_susc.target.posterior.LocalPosterior` finds a split for its (model, component)
with :func:`find_split`, checks at construction that it reproduces the plain per-item
losses at w* on a training batch (within float tolerance), and otherwise warns and runs
the plain forward. The loss function itself still runs per replica (under ``vmap``, on
the replica's outputs; or once on all of them when it declares ``broadcasts_replicas``),
so any ``loss_fn`` that calls the model once works. The draws are the same either way up
to float rounding (``tests/test_splits.py``); only the work per step differs.

Built in: a single attention head (its slices of ``W_Q``, ``W_K``, ``W_V``, ``W_O``,
``b_Q``, ``b_K``, ``b_V``, any subset of their entries) of the package's
:class:`~bayes_susc.demo.model.AttnOnlyTransformer` and of TransformerLens 3.x
``HookedTransformer`` models with standard (learned absolute) positional embeddings;
and any component of an attention-only TransformerLens model (one replica-batched
forward with fused attention). Users add their own with :func:`register_split`.

Three further savings of the head splits, each exact up to float rounding:

- the prefix does not depend on which head of a layer is sampled (a replica's head
  output replaces the head's output at w*, a rank-2·d_head update of the residual
  stream), so the heads of one layer share it: computed once per batch for all of
  them (``SHARED_PREFIX_BYTES`` bounds it), and the prefix of the layer above starts
  from the residual stream cached in it instead of re-running the layers below;
- the first map above the head — the next layer's norm and Q/K/V projection, or the
  final norm and the unembedding — is a LayerNorm and a linear map of that low-rank
  update of a frozen stream: its frozen part is cached with the prefix and each
  replica adds a d_head-wide product (:class:`_LowRankReadout`) instead of a
  d_model-wide one;
- the later layers' attention runs fused (no (pos × pos) score tensor in memory).
"""

from __future__ import annotations

import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayes_susc.target.components import ResolvedComponent

__all__ = [
    "AttnOnlyHeadSplit",
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


def _replica_head_z(
    x: Tensor,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor],
    prefix: str,
    head: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """One head's causal attention for every replica, before its output projection.

    x (batch, pos, d_model) shared by all replicas; the head's weights per replica
    (``W_Q/W_K/W_V`` (R, d_model, d_head), ``b_*`` (R, d_head), ``W_O`` (R, d_head,
    d_model), R = replicas or 1); ``scale`` multiplies q·k -> (z (R or 1, batch, pos,
    d_head): 1 when W_Q, W_K, W_V and their biases are all frozen; the head's ``W_O`` (R or
    1, d_head, d_model)); the head's output is ``z @ W_O``, broadcast over replicas.
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
    return z, w("W_O")


def _fold(t: Tensor) -> Tensor:
    """(replicas, batch, ...) -> (replicas * batch, ...): frozen layers see one batch."""
    return t.reshape((-1,) + t.shape[2:])


class _Norm:
    """A frozen LayerNorm over the last axis (weight ``w``/bias ``b`` (d,) or None for
    TransformerLens's ``LayerNormPre``), or the identity (``eps`` None). x (..., d) ->
    (..., d)."""

    def __init__(self, w: Tensor | None, b: Tensor | None, eps: float | None) -> None:
        self.w, self.b, self.eps = w, b, eps

    def __call__(self, x: Tensor) -> Tensor:
        if self.eps is None:
            return x
        return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)


def _norm_of(module: nn.Module) -> _Norm | None:
    """``module`` as a fused :class:`_Norm` when it is one this file reproduces exactly
    (the package's or TransformerLens's LayerNorm, ``LayerNormPre``, ``nn.Identity``),
    else None (call the module itself)."""
    if isinstance(module, nn.Identity):
        return _Norm(None, None, None)
    kind = type(module).__name__
    cfg = getattr(module, "cfg", None)
    if getattr(cfg, "dtype", torch.float32) not in (torch.float32, torch.float64):
        return None  # TransformerLens upcasts low-precision norms; leave it to them
    if kind == "LayerNorm" and hasattr(module, "w") and hasattr(module, "b"):
        return _Norm(module.w.detach(), module.b.detach(), float(module.eps))
    if kind == "LayerNormPre" and hasattr(module, "eps"):
        return _Norm(None, None, float(module.eps))
    return None


def _fused_layer_norm(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """A frozen norm as one fused kernel where :func:`_norm_of` knows it (TransformerLens's
    LayerNorm is five elementwise passes), else the module itself."""
    return _norm_of(module) or module


class _LowRankReadout:
    """``norm(P + z @ W_O) @ W + bias`` for a frozen residual stream P and one head's
    per-replica output ``z @ W_O`` (rank d_head).

    The first frozen map above a head reads the stream through a norm and a linear layer
    (the next layer's fused Q/K/V projection, or the final norm and the unembedding). With
    c(·) centring over d_model, LayerNorm's numerator is c(P) + z c(W_O), its variance
    (|c(P)|² + 2 z·(c(W_O) c(P)) + z G zᵀ)/d with G = c(W_O) c(W_O)ᵀ, and the linear map
    of the numerator is (g ⊙ c(P)) W — the same for every replica, cached per batch — plus
    z (g ⊙ c(W_O)) W: per token a d_head × out product instead of d_model × out, and no
    norm pass over the replicas' streams. Equal to the plain path up to float rounding.
    """

    def __init__(self, norm: _Norm, W: Tensor, bias: Tensor) -> None:
        self.norm, self.W = norm, W
        self.offset = bias if norm.b is None else bias + norm.b @ W

    def prefix(self, stream: Tensor) -> tuple[Tensor, ...]:
        """The per-batch part from P (batch, pos, d): (c(P), |c(P)|², (g ⊙ c(P)) W) for a
        LayerNorm, (P W + bias,) for the identity."""
        if self.norm.eps is None:
            return (stream @ self.W + self.offset,)
        centred = stream - stream.mean(-1, keepdim=True)
        scaled = centred if self.norm.w is None else centred * self.norm.w
        return centred, (centred * centred).sum(-1), scaled @ self.W

    def __call__(
        self, cached: tuple[Tensor, ...], z: Tensor, W_O: Tensor, parts: int = 1
    ) -> tuple[Tensor, ...]:
        """z (R, batch, pos, e), W_O (R or 1, e, d) -> the result (R, batch, pos, out) cut
        into ``parts`` equal slices of the out axis, each its own contiguous tensor (Q, K
        and V separately: their gradients then need no re-assembly)."""
        replicas, b, p, e = z.shape
        flat = z.reshape(replicas, b * p, e)
        # Per slice two passes over the (R, tokens, out) result, each writing it once: on
        # CPU these outputs outgrow the caches and every extra elementwise pass costs as
        # much as the small matmul.
        if self.norm.eps is None:
            (base,) = cached
            mixing = W_O @ self.W  # (R', e, out)
            outs = []
            for b_part, m_part in zip(
                base.reshape(b * p, -1).chunk(parts, -1), mixing.chunk(parts, -1)
            ):
                start = b_part.unsqueeze(0).expand(replicas, -1, -1)
                outs.append(torch.baddbmm(start, flat, m_part.expand(replicas, -1, -1)))
            return tuple(o.reshape(replicas, b, p, -1) for o in outs)
        centred, square, base = cached
        d = centred.shape[-1]
        cW = W_O - W_O.mean(-1, keepdim=True)
        mixing = (cW if self.norm.w is None else cW * self.norm.w) @ self.W  # (R', e, out)
        cross = torch.matmul(centred.reshape(b * p, d), cW.transpose(-1, -2))  # (R', bp, e)
        quadratic = torch.matmul(flat, cW @ cW.transpose(-1, -2))
        variance = (square.reshape(b * p) + ((2 * cross + quadratic) * flat).sum(-1)) / d
        inv_std = torch.rsqrt(variance + self.norm.eps)[..., None]  # (R, bp, 1)
        scaled = flat * inv_std
        outs = []
        for b_part, m_part, o_part in zip(
            base.reshape(b * p, -1).chunk(parts, -1),
            mixing.chunk(parts, -1),
            self.offset.chunk(parts, -1),
        ):
            out = torch.addcmul(o_part, b_part, inv_std)
            outs.append(out.baddbmm_(scaled, m_part.expand(replicas, -1, -1)))
        return tuple(o.reshape(replicas, b, p, -1) for o in outs)


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

    def attend(self, qkv: Tensor | tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Projected queries, keys, values -> z (b, p, n, e): qkv (b, p, 3 n e), or three
        tensors (b, p, n e)."""
        if isinstance(qkv, Tensor):
            b, p, _ = qkv.shape
            q, k, v = qkv.reshape((b, p) + self.shape).permute(2, 0, 3, 1, 4)  # (b, n, p, e)
        else:
            b, p, _ = qkv[0].shape
            q, k, v = (t.reshape((b, p) + self.shape[1:]).transpose(1, 2) for t in qkv)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return z.transpose(1, 2)

    def z(self, x: Tensor) -> Tensor:
        """Every head's attention-weighted values: x (b, p, d) -> z (b, p, n, e)."""
        b, p, d = x.shape
        qkv = torch.addmm(self.b_qkv, x.reshape(b * p, d), self.W_qkv)
        return self.attend(qkv.reshape(b, p, -1))

    def project(self, z: Tensor) -> Tensor:
        """z (b, p, n, e) -> the layer's output (b, p, d)."""
        b, p = z.shape[:2]
        return torch.addmm(self.b_O, z.reshape(b * p, -1), self.W_O).reshape(b, p, -1)

    def __call__(self, x: Tensor) -> Tensor:
        return self.project(self.z(x))


#: Bytes of frozen prefixes kept per (model, layer) and shared by all head splits of
#: that layer (least recently used batches dropped first). Each LocalPosterior's own
#: ``prefix_cache_bytes`` bounds what it holds on to as well.
SHARED_PREFIX_BYTES = 2**30


class _LayerPrefixCache:
    """The frozen computation up to and including every head of one layer, per batch of
    tokens, shared by the head splits of that layer: eight heads of a layer sampled one
    after another compute it once per batch instead of eight times.

    ``(tokens, compute)`` -> ``compute(tokens)``, cached while the tokens tensor lives and
    is not modified in place. The caller passes ``compute`` (its own bound method) at each
    call: the cache lives in a module-level table weakly keyed by the model, and holding a
    function that reaches the model would keep every model alive for good.
    """

    def __init__(self) -> None:
        self.entries: OrderedDict[int, tuple[weakref.ref, int, tuple, int]] = OrderedDict()
        self.bytes = 0

    def __call__(
        self, tokens: Tensor, compute: Callable[[Tensor], tuple[Any, ...]]
    ) -> tuple[Any, ...]:
        key = id(tokens)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is tokens and hit[1] == tokens._version:
            self.entries.move_to_end(key)
            return hit[2]
        value = compute(tokens)
        self._drop(key)
        size = sum(t.nbytes for t in value if isinstance(t, Tensor))
        ref = weakref.ref(tokens, lambda dead, key=key: self._drop(key, dead))
        self.entries[key] = (ref, tokens._version, value, size)
        self.bytes += size
        while self.bytes > SHARED_PREFIX_BYTES and len(self.entries) > 1:
            self._drop(next(iter(self.entries)))
        return value

    def peek(self, tokens: Tensor) -> tuple[Any, ...] | None:
        """The cached prefix of ``tokens`` if there is a valid one, else None (nothing
        computed)."""
        hit = self.entries.get(id(tokens))
        if hit is None or hit[0]() is not tokens or hit[1] != tokens._version:
            return None
        self.entries.move_to_end(id(tokens))
        return hit[2]

    def _drop(self, key: int, ref: weakref.ref | None = None) -> None:
        entry = self.entries.get(key)
        if entry is not None and (ref is None or entry[0] is ref):
            del self.entries[key]
            self.bytes -= entry[3]


_LAYER_CACHES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _LayerPrefixCache]] = (
    weakref.WeakKeyDictionary()
)


class _HeadSplit(ForwardSplit):
    """One attention head of a pre-norm transformer (see the subclasses).

    The prefix runs the blocks below ``layer`` and every head of block ``layer`` (their
    attention fused) and keeps the head's layer's normalized input x, the residual
    stream after the layer's attention at w* (P), every head's attention output z*, and
    — where the first map above the head is a frozen norm and linear layer — that map's
    per-batch part of P (:class:`_LowRankReadout`). None of it depends on which head is
    sampled, so all head splits of a layer share it (:class:`_LayerPrefixCache`). The
    suffix swaps the head's output at w* for each replica's — P + [z, z*] [W_O; −W_O*], a
    rank-2·d_head update — and runs the rest on all replicas as one batch.

    Subclasses set ``embed`` (tokens -> residual), ``blocks`` ((norm, fused attention)
    per layer), ``mlps`` (per layer: resid -> the MLP's output, or None), ``final_norm``,
    ``W_U`` (d, vocab), ``b_U`` (vocab,), and call :meth:`_setup`.
    """

    embed: Callable[[Tensor], Tensor]
    blocks: list[tuple[Callable[[Tensor], Tensor], _FusedAttention]]
    mlps: list[Callable[[Tensor], Tensor] | None]
    final_norm: Callable[[Tensor], Tensor]
    W_U: Tensor
    b_U: Tensor

    def _setup(
        self, model: nn.Module, attn: nn.Module, layer: int, head: int, norms: list[nn.Module]
    ) -> None:
        """Frozen slices of the head's layer; the readout when the map above it allows;
        the layer's shared prefix cache. ``norms``: the norm modules after the head's
        layer in order (later blocks' ln1, then the final norm)."""
        self.layer, self.head = layer, head
        self.prefix_name = f"blocks.{layer}.attn."
        self.frozen = {self.prefix_name + n: p.detach() for n, p in attn.named_parameters()}
        self.scale = self.blocks[layer][1].scale
        self.readout: _LowRankReadout | None = None
        norm = _norm_of(norms[0])
        if self.mlps[layer] is None and norm is not None:
            if layer + 1 < len(self.blocks):
                attention = self.blocks[layer + 1][1]
                self.readout = _LowRankReadout(norm, attention.W_qkv, attention.b_qkv)
            else:
                self.readout = _LowRankReadout(norm, self.W_U, self.b_U)
        # Shared only while every weight is the one these splits were built from.
        weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
        caches = _LAYER_CACHES.setdefault(model, {})
        key = (type(self).__name__, layer, self.readout is not None, weights)
        if key not in caches:
            for stale in [k for k in caches if k[3] != weights]:
                del caches[stale]  # built from other weights: never used again
            caches[key] = _LayerPrefixCache()
        self.layer_prefix = caches[key]
        self._cache_key = key

    def _stream_into_layer(self, tokens: Tensor) -> Tensor:
        """The residual stream entering block ``layer`` at w*, (batch, pos, d_model). When
        a head split of the block below holds these tokens in its shared prefix, that
        block's P (and its MLP) gives it: the blocks below are not run again, so a model's
        heads sampled layer by layer run each frozen block once per batch, not once per
        layer above it."""
        kind, _, _, weights = self._cache_key
        below = self.layer - 1
        caches = _LAYER_CACHES.get(self.model, {}) if below >= 0 else {}
        for has_readout in (True, False):  # either kind of split below holds the same P
            cache = caches.get((kind, below, has_readout, weights))
            hit = cache.peek(tokens) if cache is not None else None
            if hit is not None:
                stream, mlp = hit[1], self.mlps[below]
                return stream if mlp is None else stream + mlp(stream)
        resid = self.embed(tokens)
        for (norm, attention), mlp in zip(self.blocks[: self.layer], self.mlps):
            resid = resid + attention(norm(resid))
            if mlp is not None:
                resid = resid + mlp(resid)
        return resid

    def _layer_prefix(self, tokens: Tensor) -> tuple[Any, ...]:
        """(x, P, z* (b, p, n_heads, d_head), the readout's part of P or None)."""
        resid = self._stream_into_layer(tokens)
        norm, attention = self.blocks[self.layer]
        x = norm(resid)
        z = attention.z(x)
        stream = resid + attention.project(z)
        read = self.readout.prefix(stream) if self.readout is not None else None
        return x, stream, z, read

    def prefix(self, tokens: Tensor, **kwargs: Any) -> tuple[Any, ...]:
        if kwargs:
            raise TypeError(f"unsupported call arguments {sorted(kwargs)}")
        x, stream, z, read = self.layer_prefix(tokens, self._layer_prefix)
        return x, stream, z[:, :, self.head], read

    def suffix(self, params: Mapping[str, Tensor], cached: tuple[Any, ...]) -> Tensor:
        x, stream, z_star, read = cached
        z, W_O = _replica_head_z(x, params, self.frozen, self.prefix_name, self.head, self.scale)
        # A component freeing only W_O leaves z the same for every replica (one copy).
        replicas = max(z.shape[0], W_O.shape[0])
        z = z.expand((replicas,) + z.shape[1:])
        # The replica's head output in place of the one at w*: [z, z*] @ [W_O; -W_O*].
        z = torch.cat([z, z_star.expand(z.shape)], dim=-1)
        W_star = self.frozen[self.prefix_name + "W_O"][self.head]
        W_O = torch.cat([W_O, -W_star.expand(W_O.shape)], dim=-2)
        if self.readout is not None and self.layer + 1 == len(self.blocks):
            return self.readout(read, z, W_O)[0]  # the head's layer is the last: logits
        resid = _fold(stream + torch.einsum("rbpk,rkd->rbpd", z, W_O))
        later = self.layer + 1
        if self.readout is not None:
            attention = self.blocks[later][1]
            q, k, v = (_fold(t) for t in self.readout(read, z, W_O, parts=3))
            resid = resid + attention.project(attention.attend((q, k, v)))
            later += 1
        elif self.mlps[self.layer] is not None:
            resid = resid + self.mlps[self.layer](resid)
        for (norm, attention), mlp in zip(self.blocks[later:], self.mlps[later:]):
            resid = resid + attention(norm(resid))
            if mlp is not None:
                resid = resid + mlp(resid)
        final = self.final_norm(resid)
        logits = torch.addmm(self.b_U, final.reshape(-1, final.shape[-1]), self.W_U)
        return logits.reshape((replicas, -1) + resid.shape[1:2] + logits.shape[-1:])


class AttnOnlyHeadSplit(_HeadSplit):
    """One head of :class:`~bayes_susc.demo.model.AttnOnlyTransformer` (with or
    without LayerNorm): see :class:`_HeadSplit`."""

    name = "attn_only_head"

    def __init__(self, model: nn.Module, layer: int, head: int) -> None:
        self.model = model
        self.embed = model.embed_tokens
        self.blocks = [
            (_fused_layer_norm(b.ln1), _FusedAttention(b.attn, b.attn.scale)) for b in model.blocks
        ]
        self.mlps = [None] * len(model.blocks)
        self.final_norm = _fused_layer_norm(model.ln_final)
        self.W_U = model.unembed.W_U.detach()
        self.b_U = model.unembed.b_U.detach()
        norms = [b.ln1 for b in model.blocks[layer + 1 :]] + [model.ln_final]
        self._setup(model, model.blocks[layer].attn, layer, head, norms)


class TransformerLensHeadSplit(_HeadSplit):
    """One head of a TransformerLens 3.x ``HookedTransformer`` (pre-norm blocks, learned
    absolute positions, no rotary/ALiBi, no grouped keys): see :class:`_HeadSplit`. In a
    model with MLPs the head's own block's MLP runs in the suffix."""

    name = "transformer_lens_head"

    def __init__(self, model: nn.Module, layer: int, head: int) -> None:
        self.model = model
        self.embed = lambda tokens: model.embed(tokens) + model.pos_embed(tokens)
        # Attention fused (TransformerLens materializes and masks the scores tensor in
        # several passes; the replicas make it 4x larger still).
        self.blocks = [
            (_fused_layer_norm(b.ln1), _FusedAttention(b.attn, 1.0 / b.attn.attn_scale))
            for b in model.blocks
        ]
        self.mlps = [
            None if model.cfg.attn_only else (lambda r, b=b: b.apply_mlp(b.ln2(r)))
            for b in model.blocks
        ]
        self.final_norm = _fused_layer_norm(model.ln_final)
        self.W_U = model.unembed.W_U.detach()
        self.b_U = model.unembed.b_U.detach()
        norms = [b.ln1 for b in model.blocks[layer + 1 :]] + [model.ln_final]
        self._setup(model, model.blocks[layer].attn, layer, head, norms)


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


def _cat_replicas(tensors: list[Tensor]) -> Tensor:
    """Concatenate (R or 1, k_i, ...) tensors along axis 1, broadcasting the replica axis."""
    replicas = max(t.shape[0] for t in tensors)
    return torch.cat([t.expand((replicas,) + t.shape[1:]) for t in tensors], dim=1)


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
            x = self._norm(params, pre + "ln1.", resid).reshape(replicas, b * p, -1)
            # Q, K and V of every head as one product with the bias folded in.
            weight = _cat_replicas([self._w(params, pre + f"attn.W_{c}") for c in "QKV"])
            heads3, d, e = weight.shape[1:]
            weight = weight.permute(0, 2, 1, 3).reshape(-1, d, heads3 * e)
            offset = _cat_replicas([self._w(params, pre + f"attn.b_{c}") for c in "QKV"])
            qkv = torch.baddbmm(
                offset.reshape(-1, 1, heads3 * e), x, weight.expand(replicas, -1, -1)
            )
            n = heads3 // 3
            q, k, v = qkv.reshape(replicas * b, p, 3, n, e).permute(2, 0, 3, 1, 4)
            z = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=1.0 / block.attn.attn_scale
            )  # (R b, n, p, e)
            z = z.transpose(1, 2).reshape(replicas, b * p, n * e)
            W_O = self._w(params, pre + "attn.W_O").reshape(-1, n * e, d)
            b_O = self._w(params, pre + "attn.b_O")
            out = torch.baddbmm(b_O[:, None, :], z, W_O.expand(replicas, -1, -1))
            resid = resid + out.reshape(replicas, b, p, d)
        x = self._norm(params, "ln_final.", resid).reshape(replicas, b * p, -1)
        W_U = self._w(params, "unembed.W_U")
        b_U = self._w(params, "unembed.b_U")
        logits = torch.baddbmm(b_U[:, None, :], x, W_U.expand(replicas, -1, -1))
        return logits.reshape(replicas, b, p, -1)


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

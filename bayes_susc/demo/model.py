"""A small attention-only transformer with TransformerLens-style parameter layout.

Parameter names and shapes (``n`` heads, ``d`` = d_model, ``e`` = d_head, ``V`` = d_vocab):

    embed.W_E            (V, d)          pos_embed.W_pos   (n_ctx, d)
    blocks.{l}.ln1.w/.b  (d,)            [only when ``layernorm``]
    blocks.{l}.attn.W_Q/W_K/W_V  (n, d, e)   b_Q/b_K/b_V  (n, e)
    blocks.{l}.attn.W_O  (n, e, d)           b_O          (d,)
    ln_final.w/.b        (d,)            [only when ``layernorm``]
    unembed.W_U          (d, V)          unembed.b_U       (V,)

so the weights of head ``h`` in layer ``l`` are the index slices ``[h]`` of the attention
tensors. The forward pass uses only out-of-place tensor ops (einsum, ``torch.where``,
``F.layer_norm``), so it works under ``torch.func.functional_call`` / ``vmap`` / ``grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayes_susc.target.architectures import register_architecture
from bayes_susc.target.components import Component, ResolvedComponent
from bayes_susc.target.losses import loss_from_logits, next_token_loss
from bayes_susc.target.splits import AttnOnlyHeadSplit, ForwardSplit, head_of, register_split

__all__ = [
    "AttnOnlyConfig",
    "AttnOnlyTransformer",
    "attention_patterns",
    "head_components",
    "loss_from_logits",
    "next_token_loss",
]

_INIT_STD = 0.02


@dataclass
class AttnOnlyConfig:
    """Hyperparameters of :class:`AttnOnlyTransformer` (defaults: a 2-layer byte model)."""

    n_layers: int = 2
    n_heads: int = 8
    d_model: int = 128
    d_head: int = 16
    n_ctx: int = 128
    d_vocab: int = 256
    layernorm: bool = True
    ln_eps: float = 1e-5


def _normal(shape: tuple[int, ...], gen: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=gen) * _INIT_STD)


class Embed(nn.Module):
    """Token embedding: ``W_E`` (d_vocab, d_model)."""

    def __init__(self, cfg: AttnOnlyConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.W_E = _normal((cfg.d_vocab, cfg.d_model), gen)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (batch, pos) -> (batch, pos, d_model)."""
        # F.embedding has a deterministic backward on CPU; W_E[tokens] (index_put) does not.
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    """Learned positional embedding: ``W_pos`` (n_ctx, d_model)."""

    def __init__(self, cfg: AttnOnlyConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.W_pos = _normal((cfg.n_ctx, cfg.d_model), gen)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (batch, pos) -> (1, pos, d_model), broadcast over the batch."""
        return self.W_pos[: tokens.shape[-1]].unsqueeze(0)


class LayerNorm(nn.Module):
    """LayerNorm over d_model with weight ``w`` and bias ``b`` (both (d_model,))."""

    def __init__(self, cfg: AttnOnlyConfig) -> None:
        super().__init__()
        self.eps = cfg.ln_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_model) -> (..., d_model)."""
        return F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)


class Attention(nn.Module):
    """Causal multi-head softmax attention with per-head weight tensors."""

    def __init__(self, cfg: AttnOnlyConfig, gen: torch.Generator) -> None:
        super().__init__()
        n, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = _normal((n, d, e), gen)
        self.W_K = _normal((n, d, e), gen)
        self.W_V = _normal((n, d, e), gen)
        self.W_O = _normal((n, e, d), gen)
        self.b_Q = nn.Parameter(torch.zeros(n, e))
        self.b_K = nn.Parameter(torch.zeros(n, e))
        self.b_V = nn.Parameter(torch.zeros(n, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.scale = 1.0 / math.sqrt(e)
        # True above the diagonal = key position after query position (masked out).
        mask = torch.triu(torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def pattern(self, x: Tensor) -> Tensor:
        """x (batch, pos, d_model) -> attention pattern (batch, n_heads, q_pos, k_pos)."""
        q = torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q
        k = torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * self.scale
        p = x.shape[-2]
        scores = torch.where(self.mask[:p, :p], float("-inf"), scores)
        return torch.softmax(scores, dim=-1)

    def forward(self, x: Tensor, return_pattern: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x (batch, pos, d_model) -> (batch, pos, d_model) [, pattern (batch, head, q, k)]."""
        pattern = self.pattern(x)
        v = torch.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        out = torch.einsum("bqhe,hed->bqd", z, self.W_O) + self.b_O
        return (out, pattern) if return_pattern else out


class Block(nn.Module):
    """Residual attention block: ``resid + attn(ln1(resid))``."""

    def __init__(self, cfg: AttnOnlyConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.ln1: nn.Module = LayerNorm(cfg) if cfg.layernorm else nn.Identity()
        self.attn = Attention(cfg, gen)

    def forward(
        self, resid: Tensor, return_pattern: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """resid (batch, pos, d_model) -> (batch, pos, d_model) [, pattern]."""
        out = self.attn(self.ln1(resid), return_pattern=return_pattern)
        if return_pattern:
            return resid + out[0], out[1]
        return resid + out


class Unembed(nn.Module):
    """Unembedding: ``W_U`` (d_model, d_vocab), ``b_U`` (d_vocab,)."""

    def __init__(self, cfg: AttnOnlyConfig, gen: torch.Generator) -> None:
        super().__init__()
        self.W_U = _normal((cfg.d_model, cfg.d_vocab), gen)
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))

    def forward(self, x: Tensor) -> Tensor:
        """x (batch, pos, d_model) -> logits (batch, pos, d_vocab)."""
        return x @ self.W_U + self.b_U


class AttnOnlyTransformer(nn.Module):
    """Attention-only transformer (token + learned positional embedding, pre-LN blocks).

    Args:
        cfg: configuration; defaults to ``AttnOnlyConfig()``.
        generator: a ``torch.Generator`` or an integer seed for the initialization
            (``None``: a fresh generator seeded from torch's global RNG).
    """

    def __init__(
        self,
        cfg: AttnOnlyConfig | None = None,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else AttnOnlyConfig()
        if isinstance(generator, torch.Generator):
            gen = generator
        else:
            gen = torch.Generator()
            seed = generator if generator is not None else int(torch.randint(2**62, ()).item())
            gen.manual_seed(seed)
        self.embed = Embed(cfg, gen)
        self.pos_embed = PosEmbed(cfg, gen)
        self.blocks = nn.ModuleList([Block(cfg, gen) for _ in range(cfg.n_layers)])
        self.ln_final: nn.Module = LayerNorm(cfg) if cfg.layernorm else nn.Identity()
        self.unembed = Unembed(cfg, gen)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (batch, pos) -> initial residual stream (batch, pos, d_model)."""
        return self.embed(tokens) + self.pos_embed(tokens)

    def forward_from(self, resid: Tensor, start_layer: int = 0) -> Tensor:
        """Run blocks ``start_layer..`` and the unembedding on a residual stream.

        resid (batch, pos, d_model) (the input of block ``start_layer``)
        -> logits (batch, pos, d_vocab).
        """
        for block in self.blocks[start_layer:]:
            resid = block(resid)
        return self.unembed(self.ln_final(resid))

    def residual_before(self, tokens: Tensor, layer: int) -> Tensor:
        """tokens (batch, pos) -> input of block ``layer`` (batch, pos, d_model)."""
        resid = self.embed_tokens(tokens)
        for block in self.blocks[:layer]:
            resid = block(resid)
        return resid

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: LongTensor (batch, pos), pos <= n_ctx -> logits (batch, pos, d_vocab)."""
        return self.forward_from(self.embed_tokens(tokens), 0)

    def attention_patterns(self, tokens: Tensor) -> Tensor:
        """tokens (batch, pos) -> patterns (n_layers, batch, n_heads, q_pos, k_pos)."""
        resid = self.embed_tokens(tokens)
        patterns = []
        for block in self.blocks:
            resid, pattern = block(resid, return_pattern=True)
            patterns.append(pattern)
        return torch.stack(patterns)


def attention_patterns(model: AttnOnlyTransformer, tokens: Tensor) -> Tensor:
    """Attention patterns of every head: (n_layers, batch, n_heads, q_pos, k_pos)."""
    return model.attention_patterns(tokens)


def head_components(model: AttnOnlyTransformer) -> list[Component]:
    """One component per attention head: its slices of W_Q, W_K, W_V, W_O, b_Q, b_K, b_V.

    The shared output bias ``b_O`` belongs to no head. Names are ``L{layer}H{head}``.
    """
    out = []
    for layer in range(model.cfg.n_layers):
        prefix = f"blocks.{layer}.attn."
        for head in range(model.cfg.n_heads):
            selections = {
                prefix + p: (head,) for p in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
            }
            out.append(Component(f"L{layer}H{head}", selections))
    return out


def _head_split(model: nn.Module, component: ResolvedComponent) -> ForwardSplit | None:
    where = head_of(component)
    if not isinstance(model, AttnOnlyTransformer) or where is None or where[0]:
        return None
    return AttnOnlyHeadSplit(model, where[1], where[2])


# The adapter: the component helpers and the head split learn this model when (and
# only when) it is imported, so the core never imports the demo.
register_architecture(
    "attn_only",
    is_model=lambda m: isinstance(m, AttnOnlyTransformer),
    is_attention=lambda m: isinstance(m, Attention),
)
register_split(_head_split)

"""Next-token losses of language models, unreduced, safe under ``torch.func`` transforms."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["loss_from_logits", "next_token_loss"]

_IGNORE = -100  # cross_entropy's ignore_index for the final position


def loss_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-token next-token cross-entropy in nats.

    logits (..., batch, pos, d_vocab), tokens (batch, pos) -> losses (..., batch, pos - 1),
    where ``losses[..., b, t]`` is the loss of predicting ``tokens[b, t + 1]`` from
    ``logits[..., b, t]`` (leading dimensions, e.g. replicas, share the tokens).
    """
    # Cross-entropy over every position with the last one ignored, then the last loss
    # dropped: slicing the logits instead would copy them, and their gradient, once more.
    target = F.pad(tokens[..., 1:], (0, 1), value=_IGNORE).expand(logits.shape[:-1])
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        reduction="none",
        ignore_index=_IGNORE,
    )
    return flat.reshape(logits.shape[:-1])[..., :-1]


def next_token_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """The library's ``loss_fn(model, batch)``: tokens (batch, pos) -> losses (batch, pos - 1).

    Unreduced per-token cross-entropy (nats); safe under ``torch.func`` transforms.
    """
    return loss_from_logits(model(tokens), tokens)


# Given logits with leading replica dimensions it returns losses with them (see
# LocalPosterior's ``split``): one call for all replicas instead of one under vmap.
next_token_loss.broadcasts_replicas = True  # type: ignore[attr-defined]

"""A minimal, deterministic AdamW training loop for the demo language model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayes_susc.demo.model import next_token_loss

__all__ = ["train"]


def train(
    model: nn.Module,
    tokens: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train ``model`` in place on mean next-token loss with AdamW.

    Args:
        model: maps tokens (batch, pos) to logits (batch, pos, d_vocab).
        tokens: LongTensor (n_sequences, seq_len), on the model's device.
        steps: number of optimizer steps.
        batch_size: sequences per minibatch (drawn with replacement-free random
            index sets, one per step, from a CPU generator seeded with ``seed``).
        lr: AdamW learning rate.
        seed: seed of the minibatch order; the same seed gives the same run.
        weight_decay: AdamW weight decay.

    Returns:
        The minibatch mean loss (nats) before each step, a list of length ``steps``.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = tokens.shape[0]
    model.train()
    losses: list[Tensor] = []
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[: min(batch_size, n)].to(tokens.device)
        loss = next_token_loss(model, tokens[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.eval()
    return torch.stack(losses).cpu().tolist() if losses else []

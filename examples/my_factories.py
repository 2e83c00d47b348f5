"""Plain factories for ``examples/custom_factory.toml``.

A config names them as ``"my_factories:make_model"`` / ``"my_factories:make_data"``;
``python_path = ["."]`` in the config puts this folder on ``sys.path``.

- ``make_model(**kwargs)`` returns any ``torch.nn.Module`` (its current weights are the
  anchor w*; here it is quickly fitted so w* is a trained point).
- ``make_data(**kwargs)`` returns a dict with ``train_data`` (a list of batches),
  ``eval_data`` and ``probe_data`` (a batch or a list of batches), and optionally
  ``probe_coords`` (metadata per probe item; ``dataset`` colours the report's PCA plot)
  and ``loss_fn(model, batch)`` returning one loss per item (no reduction).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * x[:, :1]) + 0.5 * x[:, 1:2] ** 2


def _sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 2, generator=generator)
    y = _target(x) + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-item squared error, shape (batch,)."""
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(-1)


def make_model(width: int = 16, seed: int = 0, train_steps: int = 300) -> nn.Module:
    """A 2 -> width -> 1 tanh MLP, fitted by Adam to the example's training data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1))
    x, y = _sample(256, g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        loss_fn(model, (x, y)).mean().backward()
        opt.step()
    return model.eval()


def make_data(n_train: int = 256, batch_size: int = 32, n_probe: int = 24, seed: int = 0):
    """Training batches, an evaluation set and probes from two regions of input space."""
    g = torch.Generator().manual_seed(seed + 1)
    x, y = _sample(n_train, g)
    train = list(zip(x.split(batch_size), y.split(batch_size)))
    eval_data = _sample(64, g)
    near = torch.randn(n_probe // 2, 2, generator=g) * 0.5
    far = torch.randn(n_probe - n_probe // 2, 2, generator=g) * 0.5 + 2.0
    px = torch.cat([near, far])
    probe = (px, _target(px))
    coords = {
        "dataset": np.array(["near origin"] * len(near) + ["far"] * len(far)),
        "x0": px[:, 0].numpy().round(3),
    }
    return {
        "train_data": train,
        "eval_data": eval_data,
        "probe_data": probe,
        "probe_coords": coords,
        "loss_fn": loss_fn,
    }

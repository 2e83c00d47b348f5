"""Synthetic series shared by the statistics tests."""

from __future__ import annotations

import math

import numpy as np


def ar1(rng: np.random.Generator, shape: tuple[int, ...], rho: float) -> np.ndarray:
    """Stationary unit-variance AR(1) along axis 1 of ``shape`` (chain, draw, ...)."""
    e = rng.standard_normal(shape)
    x = np.empty(shape)
    x[:, 0] = e[:, 0]
    for t in range(1, shape[1]):
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho**2) * e[:, t]
    return x

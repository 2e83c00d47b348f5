"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014)."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from bayes_susc.kernels.base import GradFn, NoiseSource, gradient_info, register
from bayes_susc.kernels.diffusions import underdamped_momentum
from bayes_susc.validation import check_positive


class SGHMCState(NamedTuple):
    position: torch.Tensor  # (chains, dim)
    momentum: torch.Tensor  # (chains, dim)


@register("sghmc")
class SGHMC:
    """v ← v + ε p, then p ← (1 − εα) p − ε∇U(v) + √(2αε) ξ (unit mass).

    Momentum starts from its stationary law N(0, I). The noise-estimate term B̂ of
    Chen et al. is taken as zero. On a quadratic potential the pair (δ, p) is a linear
    recursion whose stationary covariance solves a discrete Lyapunov equation.

    Args:
        step_size: ε (> 0); default 1e-3.
        friction: α (> 0) with εα < 1; default 100 (momentum kept 1 − εα = 0.9 per
            step at ε = 1e-3).
    """

    name: ClassVar[str]
    full_batch: ClassVar[bool] = False

    def __init__(self, step_size: float = 1e-3, friction: float = 100.0) -> None:
        self.step_size = check_positive("step_size", step_size)
        self.friction = check_positive("friction", friction)
        if self.step_size * self.friction >= 1:
            raise ValueError(
                f"step_size * friction must be < 1, got {self.step_size} * {self.friction}"
            )

    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size, "friction": self.friction}

    def init(self, position: torch.Tensor, grad_fn: GradFn, noise: NoiseSource) -> SGHMCState:
        return SGHMCState(position, noise.normal(position.shape[-1]))

    def step(self, state: SGHMCState, grad_fn: GradFn, noise: NoiseSource):
        position = state.position + self.step_size * state.momentum
        res = grad_fn(position)
        xi = noise.normal(position.shape[-1])
        momentum = underdamped_momentum(
            state.momentum, res.grad, self.step_size, self.friction, self.friction, xi
        )
        return SGHMCState(position, momentum), gradient_info(res)

"""Stochastic gradient Langevin dynamics (Welling & Teh 2011)."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from bayes_susc.kernels.base import GradFn, NoiseSource, gradient_info, register
from bayes_susc.kernels.diffusions import overdamped_step
from bayes_susc.validation import check_positive


class SGLDState(NamedTuple):
    position: torch.Tensor  # (chains, dim)


@register("sgld")
class SGLD:
    """v ← v − (ε/2)∇U + √ε ξ, with ∇U on the step's minibatch.

    On a quadratic potential ½δᵀKδ (full batch) its stationary law is
    N(0, (K − εK²/4)⁻¹), stable while ε·λmax(K) < 4.

    Args:
        step_size: ε (> 0), Welling–Teh convention; default 1e-3.
    """

    name: ClassVar[str]
    full_batch: ClassVar[bool] = False

    def __init__(self, step_size: float = 1e-3) -> None:
        self.step_size = check_positive("step_size", step_size)

    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size}

    def init(self, position: torch.Tensor, grad_fn: GradFn, noise: NoiseSource) -> SGLDState:
        return SGLDState(position)

    def step(self, state: SGLDState, grad_fn: GradFn, noise: NoiseSource):
        res = grad_fn(state.position)
        xi = noise.normal(state.position.shape[-1])
        return SGLDState(
            overdamped_step(state.position, res.grad, self.step_size, xi)
        ), gradient_info(res)

"""The two integrators every SG-MCMC kernel here is built from.

Step size ε follows the Welling–Teh convention of the published hyperparameters: the
overdamped step is v ← v − (ε/2)∇U + √ε ξ. The Langevin form v ← v − ε'∇U + √(2ε') ξ
is the same rule with ε' = ε/2.
"""

from __future__ import annotations

import torch


def overdamped_step(
    position: torch.Tensor,
    grad: torch.Tensor,
    step_size: float,
    noise: torch.Tensor,
    preconditioner: torch.Tensor | None = None,
) -> torch.Tensor:
    """v − (ε/2) G⊙∇U + √(εG) ξ; all tensors ``(chains, dim)``, G = 1 when None."""
    if preconditioner is None:
        return position - 0.5 * step_size * grad + step_size**0.5 * noise
    return (
        position
        - 0.5 * step_size * preconditioner * grad
        + torch.sqrt(step_size * preconditioner) * noise
    )


def underdamped_momentum(
    momentum: torch.Tensor,
    grad: torch.Tensor,
    step_size: float,
    friction: torch.Tensor | float,
    diffusion: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """p ← (1 − ε·friction) p − ε∇U + √(2·diffusion·ε) ξ, with ∇U at the *new* position.

    ``friction`` is a float (SGHMC) or a per-chain ``(chains, 1)`` thermostat (SGNHT).
    """
    return (
        (1.0 - step_size * friction) * momentum
        - step_size * grad
        + (2.0 * diffusion * step_size) ** 0.5 * noise
    )

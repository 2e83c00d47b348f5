"""Metropolis-adjusted Langevin algorithm on the full (fixed) batch."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from bayes_susc.kernels.base import GradFn, NoiseSource, register
from bayes_susc.kernels.diffusions import overdamped_step
from bayes_susc.validation import check_positive


class MALAState(NamedTuple):
    position: torch.Tensor  # (chains, dim)
    potential: torch.Tensor  # U at position, (chains,)
    grad: torch.Tensor  # ∇U at position, (chains, dim)
    loss: torch.Tensor  # mean loss at position, (chains,)


def langevin_log_proposal(
    to: torch.Tensor, frm: torch.Tensor, grad_frm: torch.Tensor, step_size: float
) -> torch.Tensor:
    """log q(to | frm) up to a constant, for the SGLD proposal N(frm − (ε/2)∇U, εI)."""
    diff = to - frm + 0.5 * step_size * grad_frm
    return -(diff * diff).sum(-1) / (2.0 * step_size)


def metropolis_log_ratio(
    current: torch.Tensor,
    current_potential: torch.Tensor,
    current_grad: torch.Tensor,
    proposal: torch.Tensor,
    proposal_potential: torch.Tensor,
    proposal_grad: torch.Tensor,
    step_size: float,
) -> torch.Tensor:
    """log of the Metropolis–Hastings ratio of a Langevin move, shape ``(chains,)``."""
    return (
        current_potential
        - proposal_potential
        + langevin_log_proposal(current, proposal, proposal_grad, step_size)
        - langevin_log_proposal(proposal, current, current_grad, step_size)
    )


@register("mala")
class MALA:
    """The SGLD proposal, accepted or rejected by Metropolis–Hastings.

    It uses the exact full-batch potential, so it samples the local posterior itself
    (no step-size bias). One gradient evaluation per step: U and ∇U at the current
    point are kept in the state.

    Args:
        step_size: ε (> 0) of the proposal; default 1e-3.
    """

    name: ClassVar[str]
    full_batch: ClassVar[bool] = True

    def __init__(self, step_size: float = 1e-3) -> None:
        self.step_size = check_positive("step_size", step_size)

    def hyperparameters(self) -> dict[str, float]:
        return {"step_size": self.step_size}

    def init(self, position: torch.Tensor, grad_fn: GradFn, noise: NoiseSource) -> MALAState:
        res = grad_fn(position)
        return MALAState(position, res.potential, res.grad, res.loss)

    def propose(
        self, state: MALAState, grad_fn: GradFn, noise: NoiseSource
    ) -> tuple[MALAState, torch.Tensor]:
        """The Langevin proposal from ``state`` and the log Metropolis–Hastings ratio of
        moving there, ``(chains,)`` (NaN, from a non-finite proposal, becomes −inf).

        Draws one normal vector per chain from ``noise``; :meth:`step` then draws one
        uniform per chain to accept or reject. The health checks score SGLD moves with
        this same proposal (:func:`bayes_susc.checks.health.mala_acceptance`).
        """
        xi = noise.normal(state.position.shape[-1])
        proposal = overdamped_step(state.position, state.grad, self.step_size, xi)
        res = grad_fn(proposal)
        log_ratio = metropolis_log_ratio(
            state.position,
            state.potential,
            state.grad,
            proposal,
            res.potential,
            res.grad,
            self.step_size,
        )
        # A non-finite proposal is rejected rather than allowed to poison the chain.
        log_ratio = torch.nan_to_num(log_ratio, nan=-torch.inf)
        return MALAState(proposal, res.potential, res.grad, res.loss), log_ratio

    def step(self, state: MALAState, grad_fn: GradFn, noise: NoiseSource):
        proposed, log_ratio = self.propose(state, grad_fn, noise)
        accept_prob = torch.exp(log_ratio.clamp(max=0.0))
        accepted = noise.uniform() < accept_prob
        keep = accepted.unsqueeze(-1)
        new = MALAState(
            torch.where(keep, proposed.position, state.position),
            torch.where(accepted, proposed.potential, state.potential),
            torch.where(keep, proposed.grad, state.grad),
            torch.where(accepted, proposed.loss, state.loss),
        )
        info = {"loss": new.loss, "potential": new.potential, "grad_norm": new.grad.norm(dim=-1)}
        info["acceptance_rate"] = accept_prob
        info["accepted"] = accepted.to(accept_prob.dtype)
        return new, info

"""Expose any bayes_susc kernel as a Pyro ``MCMCKernel``.

``pyro.infer.MCMC(PyroKernel(potential_fn, "sgld", step_size=1e-3), num_samples=...,
initial_params=...)`` then drives our update rule on a Pyro-style ``potential_fn``
(a function of a dict of tensors returning a scalar), with Pyro's progress bar,
diagnostics and sample collection. :meth:`LocalPosterior.potential_fn` and
:attr:`LocalPosterior.initial_params` plug in directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from bayes_susc.kernels.base import GradientResult, Kernel, NoiseSource, make_kernel


class PyroKernel(MCMCKernel):
    """A bayes_susc kernel behind Pyro's ``MCMCKernel`` interface (one chain).

    Args:
        potential_fn: ``params dict -> 0-d tensor`` U (negative log density, up to a
            constant); differentiated with autograd.
        kernel: registered kernel name or instance.
        seed: seed of the injected noise.
        **hyperparameters: kernel hyperparameters when ``kernel`` is a name.
    """

    def __init__(
        self,
        potential_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
        kernel: str | Kernel = "sgld",
        *,
        seed: int = 0,
        **hyperparameters: Any,
    ) -> None:
        if not callable(potential_fn):
            raise TypeError(f"potential_fn must be callable, got {potential_fn!r}")
        self.potential_fn = potential_fn
        self.kernel = make_kernel(kernel, **hyperparameters)
        self.seed = seed
        self.model = None  # Pyro checks for a model; this kernel only knows potential_fn
        self.transforms: dict[str, Any] = {}
        self._initial_params: dict[str, torch.Tensor] | None = None
        self._state: Any = None
        self._noise: NoiseSource | None = None
        self._last_info: dict[str, float] = {}
        self._accept_sum = 0.0
        self._steps = 0

    # ---------------------------------------------------------------- flattening
    def _flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[k].reshape(-1) for k in self._names]).unsqueeze(0)

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for k, shape in zip(self._names, self._shapes):
            n = int(torch.Size(shape).numel())
            out[k] = flat[start : start + n].reshape(shape)
            start += n
        return out

    def _grad_fn(self, positions: torch.Tensor) -> GradientResult:
        with torch.enable_grad():
            v = positions[0].detach().requires_grad_(True)
            potential = self.potential_fn(self._unflatten(v))
            (grad,) = torch.autograd.grad(potential, v)
        potential = potential.detach().reshape(1)
        # potential_fn gives U only; report it as the "loss" statistic as well.
        return GradientResult(potential, grad.unsqueeze(0), potential)

    # -------------------------------------------------------- MCMCKernel interface
    @property
    def initial_params(self) -> dict[str, torch.Tensor] | None:
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: Mapping[str, torch.Tensor]) -> None:
        self._initial_params = {k: v.detach().clone() for k, v in params.items()}

    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        if self._initial_params is None:
            raise ValueError("PyroKernel needs initial_params (pass them to pyro.infer.MCMC)")
        self._names = list(self._initial_params)
        self._shapes = [tuple(self._initial_params[k].shape) for k in self._names]
        start = self._flatten(self._initial_params)
        self._noise = NoiseSource([self.seed], start.device, start.dtype)
        self._state = self.kernel.init(start, self._grad_fn, self._noise)

    def sample(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._state is None:
            self.setup(0)
        current = self._flatten(params)
        if not torch.equal(current, self._state[0]):
            # Pyro handed us a point we did not produce (a restart): begin from it.
            self._state = self.kernel.init(current, self._grad_fn, self._noise)
        self._state, info = self.kernel.step(self._state, self._grad_fn, self._noise)
        self._last_info = {k: float(v.reshape(-1)[0]) for k, v in info.items()}
        self._steps += 1
        self._accept_sum += self._last_info.get("acceptance_rate", 1.0)
        return self._unflatten(self._state[0][0].detach())

    def logging(self) -> str:
        parts = [f"U={self._last_info.get('potential', float('nan')):.3g}"]
        if "acceptance_rate" in self._last_info and self._steps:
            parts.append(f"acc. prob={self._accept_sum / self._steps:.3f}")
        return ", ".join(parts)

    def diagnostics(self) -> dict[str, float]:
        out = {"steps": float(self._steps)}
        if "acceptance_rate" in self._last_info and self._steps:
            out["acceptance_rate"] = self._accept_sum / self._steps
        return out

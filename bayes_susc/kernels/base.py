"""The kernel protocol, the per-chain noise source and the name registry.

A kernel is a small object holding its hyperparameters, with two methods:

- ``init(position, grad_fn, noise) -> state``: a NamedTuple whose first field is
  ``position`` (``(chains, dim)``); every tensor field leads with the chain axis.
- ``step(state, grad_fn, noise) -> (state, info)``: one transition. ``info`` maps names
  to per-chain tensors ``(chains,)`` and holds at least ``loss``, ``potential`` and
  ``grad_norm`` of the gradient evaluation the step made.

``grad_fn(positions) -> GradientResult`` evaluates U and ∇U on the step's minibatch
(the driver binds the batch); kernels with ``full_batch = True`` are given the exact
full-batch gradient instead. Kernels never touch the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch


class GradientResult(NamedTuple):
    """Potential and gradient at a batch of positions.

    Attributes:
        potential: U at each position, shape ``(chains,)``.
        grad: ∇U, shape ``(chains, dim)``.
        loss: mean per-item loss of the batch used (nats for log-losses), ``(chains,)``.
    """

    potential: torch.Tensor
    grad: torch.Tensor
    loss: torch.Tensor


GradFn = Callable[[torch.Tensor], GradientResult]


class NoiseSource:
    """Independent Gaussian/uniform noise per chain, one ``torch.Generator`` each.

    Chain k's noise depends only on its own seed, so a chain gives the same draws
    whether it runs alone, in a vectorized group, or on another worker.
    """

    def __init__(self, seeds: list[int], device: torch.device | str, dtype: torch.dtype) -> None:
        self.seeds = list(seeds)
        self.device = torch.device(device)
        self.dtype = dtype
        self.generators = []
        for s in self.seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(s))
            self.generators.append(g)

    @property
    def num_chains(self) -> int:
        return len(self.generators)

    def normal(self, *shape: int) -> torch.Tensor:
        """Standard normal noise of shape ``(chains, *shape)``."""
        return torch.stack(
            [
                torch.randn(shape, generator=g, device=self.device, dtype=self.dtype)
                for g in self.generators
            ]
        )

    def uniform(self) -> torch.Tensor:
        """U(0, 1) draws, shape ``(chains,)``."""
        return torch.stack(
            [
                torch.rand((), generator=g, device=self.device, dtype=self.dtype)
                for g in self.generators
            ]
        )

    def get_state(self) -> list[torch.Tensor]:
        """Each chain's generator state (``torch.Generator.get_state``: a CPU ``uint8``
        tensor, 5,056 bytes for a CPU generator, 16 for a CUDA one), in chain order."""
        return [g.get_state() for g in self.generators]

    def set_state(self, states: list[torch.Tensor]) -> None:
        """Restore every chain's generator from :meth:`get_state`'s output, so each
        stream continues exactly where it was saved."""
        if len(states) != len(self.generators):
            raise ValueError(
                f"got {len(states)} generator states for {len(self.generators)} chains"
            )
        for g, s in zip(self.generators, states):
            g.set_state(s.to(device="cpu", dtype=torch.uint8))

    def subset(self, index: int) -> NoiseSource:
        """A view on chain ``index`` alone (shares its generator, so its stream continues)."""
        sub = NoiseSource.__new__(NoiseSource)
        sub.seeds = [self.seeds[index]]
        sub.device, sub.dtype = self.device, self.dtype
        sub.generators = [self.generators[index]]
        return sub


@runtime_checkable
class Kernel(Protocol):
    """What the driver needs of a kernel (see module docstring)."""

    name: ClassVar[str]
    full_batch: ClassVar[bool]
    step_size: float

    def init(self, position: torch.Tensor, grad_fn: GradFn, noise: NoiseSource) -> Any: ...

    def step(
        self, state: Any, grad_fn: GradFn, noise: NoiseSource
    ) -> tuple[Any, dict[str, torch.Tensor]]: ...

    def hyperparameters(self) -> dict[str, float]: ...


def gradient_info(res: GradientResult) -> dict[str, torch.Tensor]:
    """The per-step statistics every kernel reports about its gradient evaluation."""
    return {"loss": res.loss, "potential": res.potential, "grad_norm": res.grad.norm(dim=-1)}


_REGISTRY: dict[str, Callable[..., Kernel]] = {}


def register_kernel(name: str, factory: Callable[..., Kernel], *, overwrite: bool = False) -> None:
    """Make ``factory(**hyperparameters)`` available to configs as kernel ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"kernel name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"kernel {name!r} is already registered; pass overwrite=True to replace it"
        )
    if not callable(factory):
        raise TypeError(f"kernel factory for {name!r} must be callable, got {factory!r}")
    _REGISTRY[name] = factory


def unregister_kernel(name: str) -> None:
    """Remove a kernel registered with :func:`register_kernel`."""
    if name not in _REGISTRY:
        raise ValueError(f"no kernel {name!r} is registered; registered: {available_kernels()}")
    del _REGISTRY[name]


def available_kernels() -> list[str]:
    """Names of the registered kernels."""
    return sorted(_REGISTRY)


def kernel_hyperparameter_names(name: str) -> tuple[str, ...]:
    """The hyperparameters registered kernel ``name`` takes (its factory's keyword
    arguments, e.g. ``("step_size",)`` for SGLD), sorted."""
    import inspect

    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel {name!r}; registered kernels: {available_kernels()}")
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(sorted(p.name for p in params if p.kind in keyword))


def make_kernel(kernel: str | Kernel, **hyperparameters: Any) -> Kernel:
    """A kernel instance from a registered name (and hyperparameters) or an instance."""
    if isinstance(kernel, str):
        if kernel not in _REGISTRY:
            raise ValueError(
                f"unknown kernel {kernel!r}; registered kernels: {available_kernels()}"
            )
        return _REGISTRY[kernel](**hyperparameters)
    if hyperparameters:
        raise ValueError("hyperparameters are only accepted with a kernel name, not an instance")
    missing = [
        m for m in ("init", "step", "hyperparameters") if not callable(getattr(kernel, m, None))
    ]
    missing += [a for a in ("name", "full_batch", "step_size") if not hasattr(kernel, a)]
    if missing:
        raise TypeError(f"kernel {kernel!r} lacks {missing} of the Kernel protocol")
    return kernel


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register a kernel class under ``name`` (sets ``cls.name``)."""

    def wrap(cls: type) -> type:
        cls.name = name
        register_kernel(name, cls)
        return cls

    return wrap

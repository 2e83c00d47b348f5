"""bayes_susc: Bayesian susceptibilities of network components, with honest uncertainty.

The top-level names are imported on first use (PEP 562), so that importing a numpy-only
stage such as :mod:`bayes_susc.susceptibility` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Component": "bayes_susc.components",
    "ResolvedComponent": "bayes_susc.components",
    "DivergenceWarning": "bayes_susc.errors",
    "available_kernels": "bayes_susc.kernels",
    "make_kernel": "bayes_susc.kernels",
    "register_kernel": "bayes_susc.kernels",
    "GradientResult": "bayes_susc.posterior",
    "LocalPosterior": "bayes_susc.posterior",
    "sample": "bayes_susc.sampling",
    "get_group": "bayes_susc.storage",
    "load": "bayes_susc.storage",
    "save": "bayes_susc.storage",
}

__all__ = [
    "Component",
    "DivergenceWarning",
    "GradientResult",
    "LocalPosterior",
    "ResolvedComponent",
    "available_kernels",
    "get_group",
    "load",
    "make_kernel",
    "register_kernel",
    "sample",
    "save",
]

if TYPE_CHECKING:
    from bayes_susc.components import Component, ResolvedComponent
    from bayes_susc.errors import DivergenceWarning
    from bayes_susc.kernels import available_kernels, make_kernel, register_kernel
    from bayes_susc.posterior import GradientResult, LocalPosterior
    from bayes_susc.sampling import sample
    from bayes_susc.storage import get_group, load, save


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bayes_susc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

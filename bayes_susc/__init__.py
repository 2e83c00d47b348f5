"""bayes_susc: Bayesian susceptibilities of network components, with honest uncertainty.

The names below load on first use (PEP 562), so that ``bayes-susc --help`` and the
torch-free statistics (``bayes_susc.estimation``) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Component": "bayes_susc.target.components",
    "ResolvedComponent": "bayes_susc.target.components",
    "DivergenceWarning": "bayes_susc.errors",
    "available_kernels": "bayes_susc.kernels",
    "make_kernel": "bayes_susc.kernels",
    "register_kernel": "bayes_susc.kernels",
    "GradientResult": "bayes_susc.kernels.base",
    "LocalPosterior": "bayes_susc.target.posterior",
    "sample": "bayes_susc.sampling.driver",
    "sample_until": "bayes_susc.checks.until",
    "Target": "bayes_susc.checks.until",
    "TargetReport": "bayes_susc.checks.until",
    "estimate": "bayes_susc.estimation.susceptibility",
    "estimate_many": "bayes_susc.estimation.susceptibility",
    "local_learning_coefficient": "bayes_susc.estimation.llc",
    "susceptibility": "bayes_susc.estimation.susceptibility",
    "build_response_matrix": "bayes_susc.estimation.response_matrix",
    "get_group": "bayes_susc.storage.draws",
    "load": "bayes_susc.storage.draws",
    "save": "bayes_susc.storage.draws",
}

__all__ = [
    "Component",
    "DivergenceWarning",
    "GradientResult",
    "LocalPosterior",
    "ResolvedComponent",
    "Target",
    "TargetReport",
    "available_kernels",
    "build_response_matrix",
    "estimate",
    "estimate_many",
    "get_group",
    "load",
    "local_learning_coefficient",
    "make_kernel",
    "register_kernel",
    "sample",
    "sample_until",
    "save",
    "susceptibility",
]

if TYPE_CHECKING:
    from bayes_susc.checks.until import Target, TargetReport, sample_until
    from bayes_susc.errors import DivergenceWarning
    from bayes_susc.estimation.llc import local_learning_coefficient
    from bayes_susc.estimation.response_matrix import build_response_matrix
    from bayes_susc.estimation.susceptibility import estimate, estimate_many, susceptibility
    from bayes_susc.kernels import available_kernels, make_kernel, register_kernel
    from bayes_susc.kernels.base import GradientResult
    from bayes_susc.sampling.driver import sample
    from bayes_susc.storage.draws import get_group, load, save
    from bayes_susc.target.components import Component, ResolvedComponent
    from bayes_susc.target.posterior import LocalPosterior


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bayes_susc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

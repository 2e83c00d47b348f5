"""bayes_susc: Bayesian susceptibilities of network components, with honest uncertainty."""

__version__ = "0.1.0"

from bayes_susc.components import Component, ResolvedComponent  # noqa: E402
from bayes_susc.errors import DivergenceWarning  # noqa: E402
from bayes_susc.kernels import available_kernels, make_kernel, register_kernel  # noqa: E402
from bayes_susc.posterior import GradientResult, LocalPosterior  # noqa: E402
from bayes_susc.sampling import sample  # noqa: E402
from bayes_susc.storage import get_group, load, save  # noqa: E402

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

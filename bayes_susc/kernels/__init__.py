"""SG-MCMC kernels behind one protocol, looked up by name.

``make_kernel("sgld", step_size=1e-3)`` builds a registered kernel;
``register_kernel(name, factory)`` adds a user's own.
"""

from bayes_susc.kernels.base import (
    GradFn,
    Kernel,
    NoiseSource,
    available_kernels,
    gradient_info,
    make_kernel,
    register,
    register_kernel,
    unregister_kernel,
)
from bayes_susc.kernels.mala import MALA
from bayes_susc.kernels.psgld import PSGLD
from bayes_susc.kernels.sghmc import SGHMC
from bayes_susc.kernels.sgld import SGLD
from bayes_susc.kernels.sgnht import SGNHT

__all__ = [
    "GradFn",
    "Kernel",
    "MALA",
    "NoiseSource",
    "PSGLD",
    "SGHMC",
    "SGLD",
    "SGNHT",
    "available_kernels",
    "gradient_info",
    "make_kernel",
    "register",
    "register_kernel",
    "unregister_kernel",
]

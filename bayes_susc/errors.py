"""Errors and warnings shared by every stage; a leaf module (standard library only), so the
numpy-only statistics can name them without importing torch."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DivergenceWarning",
    "MissingDependencyError",
    "PriorDominanceWarning",
    "RunFolderBusy",
    "RunFolderError",
    "StabilityWarning",
    "UserError",
]


class DivergenceWarning(UserWarning):
    """Some chains went non-finite; their later draws are NaN and flagged."""


class StabilityWarning(UserWarning):
    """A kernel's step is beyond its stability limit on a component's stiffest curvature:
    the chains do not sample the posterior, diverging or not."""


class PriorDominanceWarning(UserWarning):
    """The prior, not the data, sets a component's posterior in nearly every direction:
    its χ are small and scale like 1/γ (raise nβ or lower γ to let the data speak)."""


class UserError(Exception):
    """Something the user can fix from the message alone (a setting, a file, a folder).

    The ``bayes-susc`` command prints the message, without a traceback, and exits with
    code 2.
    """


class ConfigError(UserError, ValueError):
    """A run or calibration config is invalid: unknown key, wrong type or value, missing
    file or factory, a model and data that do not fit."""


class RunFolderError(UserError):
    """A run folder cannot be used as asked: not writable, started with other settings,
    or holding a file that is refused (a pickled checkpoint)."""


class RunFolderBusy(RunFolderError):
    """Another process is writing into the run folder."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

"""Argument validation in one place.

Every check raises before any sampling starts, with a message naming the argument,
the value received and what was expected (scikit-learn style).
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise if it is not a finite number > 0."""
    value = check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_nonnegative(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise if it is not a finite number >= 0."""
    value = check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_finite(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_fraction(name: str, value: Any, *, open_low: bool = False) -> float:
    """Return ``value`` as a float in [0, 1) (or (0, 1) with ``open_low``), else raise."""
    value = check_finite(name, value)
    if not (0.0 < value < 1.0 if open_low else 0.0 <= value < 1.0):
        interval = "(0, 1)" if open_low else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """Return ``value`` as an int >= ``minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value

"""Errors and warnings shared by every stage; a leaf module (standard library only), so the
numpy-only statistics can name them without importing torch."""

from __future__ import annotations


class DivergenceWarning(UserWarning):
    """Some chains went non-finite; their later draws are NaN and flagged."""

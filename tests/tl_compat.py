"""TransformerLens 3.x or 4.x in the tests: which model classes this installation has.

TransformerLens 4.0 removed ``HookedTransformer`` (deprecated in 3.x) in favour of
``TransformerBridge``. The suite installs 3.x on Python 3.11 and 4.x on Python ≥ 3.12
(pyproject's ``test`` extra); tests of ``HookedTransformer`` models skip under 4.x, and
the bridge is tested under both (tests/test_architectures.py).
"""

from __future__ import annotations

from types import ModuleType

import pytest


def hooked_transformer_lens() -> ModuleType:
    """``transformer_lens`` if it has ``HookedTransformer`` (3.x), else skip the test."""
    tl = pytest.importorskip("transformer_lens")
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:  # TransformerLens >= 4.0
        pytest.skip("TransformerLens 4.x has no HookedTransformer (TransformerBridge replaces it)")
    return tl

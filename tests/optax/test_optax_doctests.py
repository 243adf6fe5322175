"""The Optax adapter's docstring examples run as written (float32, x64 off, as most users run)."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["dualopt.optax", "dualopt.optax._transform", "dualopt.optax._state", "dualopt.optax._tree"])
def test_docstring_examples(module):
    import jax

    mod = importlib.import_module(module)
    with jax.enable_x64(False):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted >= 3 and result.failed == 0, result

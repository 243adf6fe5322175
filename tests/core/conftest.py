"""Fixtures for the backend-neutral core: one test body runs on every Array API namespace.

``xp`` follows scipy's / array-api-extra's convention: it is the namespace
module itself, parametrised over numpy, array-api-strict, torch (through
array-api-compat) and jax.numpy. ``dtype`` is the float dtype's name, so a test
that takes both runs on every (namespace, dtype) pair.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator

import pytest

BACKENDS = ("numpy", "array_api_strict", "torch", "jax.numpy")
DTYPES = ("float64", "float32")


def _import_namespace(name: str) -> Any:
    if name == "torch":
        pytest.importorskip("torch")
        return importlib.import_module("array_api_compat.torch")
    return pytest.importorskip(name)


@pytest.fixture(params=BACKENDS)
def xp(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The Array API namespace under test (float64 enabled for jax inside the test only)."""
    namespace = _import_namespace(request.param)
    if request.param == "jax.numpy":
        import jax

        # A context manager, not a global config update: other suites in the
        # same xdist worker (optax adapter tests) must keep their own setting.
        with jax.enable_x64(True):
            yield namespace
    else:
        yield namespace


@pytest.fixture(params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> str:
    """Name of the float dtype under test."""
    return request.param

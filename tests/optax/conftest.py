"""Fixtures for the Optax adapter tests.

Every test here runs with ``jax_enable_x64`` on, through an autouse fixture
that wraps the test in ``jax.enable_x64(True)``: a context manager, not a
global ``jax.config.update``, because ``make test`` runs all suites in the
same xdist worker processes and other suites must keep their own setting.
A test that checks the float32-only path (x64 off, as most users run) opens
``jax.enable_x64(False)`` inside its body.
"""

from __future__ import annotations

from typing import Iterator

import pytest


@pytest.fixture(autouse=True)
def _x64() -> Iterator[None]:
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    with jax.enable_x64(True):
        yield

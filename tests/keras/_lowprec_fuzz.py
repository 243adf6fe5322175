"""Launch ``_lowprec_fuzz_checks.py`` once per Keras backend (per pytest process) and share its JSON.

jax runs in the default test run; tensorflow and torch are marked slow (see
``_launcher.keras_backends``: each backend is its own xdist group).
"""

from __future__ import annotations

import functools

import pytest

from tests.keras._launcher import keras_backends, pick, reliability_env, run_checks

__all__ = ["keras_backends", "keras_result"]


@functools.lru_cache(maxsize=None)
def _run(backend: str) -> dict:
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    pytest.importorskip("hypothesis")
    env = dict(reliability_env(), JAX_ENABLE_X64="1")  # float64 variables exist on jax only with x64
    return run_checks(backend, "tests.keras._lowprec_fuzz_checks:checks", env=env, timeout=1200)


def keras_result(backend: str, check: str) -> dict:
    return pick(_run(backend), check)

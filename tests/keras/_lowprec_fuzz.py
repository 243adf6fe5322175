"""Run ``_lowprec_fuzz_keras_worker.py`` once per Keras backend (per pytest process) and share its JSON.

jax runs in the default test run; tensorflow and torch are marked slow (see
``_reliability_keras.backend_marks``: each backend is its own xdist group).
"""

from __future__ import annotations

import functools

import pytest

from _reliability_keras import keras_backends, pick, run_json_worker, worker_env

__all__ = ["keras_backends", "keras_result"]


@functools.lru_cache(maxsize=None)
def _run(backend: str) -> dict:
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    pytest.importorskip("hypothesis")
    env = dict(worker_env(backend), JAX_ENABLE_X64="1")  # float64 variables exist on jax only with x64
    return run_json_worker("_lowprec_fuzz_keras_worker.py", ["{out}"], env,
                           prefix=f"dualopt-lowprec-keras-{backend}-", timeout=1200)


def keras_result(backend: str, check: str) -> dict:
    return pick(_run(backend), check)

"""Run ``_lowprec_fuzz_keras_worker.py`` once per Keras backend (per pytest process) and share its JSON.

jax runs in the default test run; tensorflow and torch are marked slow (see
``_reliability_keras.backend_marks``: each backend is its own xdist group).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from _reliability_keras import backend_marks, worker_env

HERE = Path(__file__).parent
BACKENDS = ("jax", "tensorflow", "torch")


def keras_backends() -> list:
    return [pytest.param(b, marks=backend_marks(b), id=b) for b in BACKENDS]


@functools.lru_cache(maxsize=None)
def _run(backend: str) -> dict:
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    pytest.importorskip("hypothesis")
    env = dict(worker_env(backend), JAX_ENABLE_X64="1")  # float64 variables exist on jax only with x64
    with tempfile.TemporaryDirectory(prefix=f"dualopt-lowprec-keras-{backend}-") as tmp:
        out = Path(tmp) / "results.json"
        proc = subprocess.run([sys.executable, str(HERE / "_lowprec_fuzz_keras_worker.py"), str(out)], env=env,
                              capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0 or not out.exists():
            return {"__crash__": f"rc={proc.returncode}\n{proc.stderr[-5000:]}"}
        return json.loads(out.read_text())


def keras_result(backend: str, check: str) -> dict:
    results = _run(backend)
    assert "__crash__" not in results, results.get("__crash__")
    r = results[check]
    assert not (isinstance(r, dict) and "__error__" in r), r.get("__error__")
    return r

"""Run ``_keras_worker.py`` once per Keras backend (per pytest worker) and hand its JSON to the tests.

Importing Keras with a backend costs 3-8 s and a process holds one backend, so
all Keras reliability checks of one backend share one subprocess (24-32 s per
backend here, mostly the import), so the tests that read it
(:func:`worker_marks`: validation, non-finite) run on every backend in the
default run. :func:`backend_marks` marks tensorflow and torch slow, for suites
whose own per-backend subprocesses are long (kill-and-resume). Each backend is
its own xdist group so that ``--dist loadgroup`` never runs one backend's
subprocess twice.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
BACKENDS = ("jax", "tensorflow", "torch")
DEFAULT_BACKENDS = ("jax",)
_MODULE = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}


def backend_marks(backend: str) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.xdist_group(f"reliability-keras-{backend}")]
    if backend not in DEFAULT_BACKENDS:
        marks.append(pytest.mark.slow)
    return marks


def keras_backends() -> list:
    return [pytest.param(b, marks=backend_marks(b), id=b) for b in BACKENDS]


def worker_marks(backend: str) -> list[pytest.MarkDecorator]:
    """Marks of a test that reads ``_keras_worker.py checks`` results: its xdist group only (not slow)."""
    return [pytest.mark.xdist_group(f"reliability-keras-{backend}")]


def worker_backends() -> list:
    return [pytest.param(b, marks=worker_marks(b), id=b) for b in BACKENDS]


def worker_env(backend: str) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
               CUDA_VISIBLE_DEVICES="")
    env.pop("JAX_ENABLE_X64", None)
    return env


def run_json_worker(script: str, args: list[str], env: dict[str, str], *, prefix: str, timeout: int) -> dict:
    """Run ``script *args`` in a fresh interpreter and return the JSON it writes (``{"__crash__": ...}`` when it
    dies or writes nothing). In ``args``, ``{out}`` stands for that JSON file and ``{tmp}`` for a scratch
    directory, both removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        out = Path(tmp) / "results.json"
        argv = [a.replace("{tmp}", tmp).replace("{out}", str(out)) for a in args]
        proc = subprocess.run([sys.executable, str(HERE / script), *argv], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            return {"__crash__": f"rc={proc.returncode}\n{proc.stderr[-5000:]}"}
        return json.loads(out.read_text())


def pick(results: dict, check: str) -> dict:
    """One check's results from a worker's JSON; fails (not errors) when the worker or the check crashed."""
    assert "__crash__" not in results, results.get("__crash__")
    r = results[check]
    assert not (isinstance(r, dict) and "__error__" in r), r.get("__error__")
    return r


@functools.lru_cache(maxsize=None)
def _run(backend: str) -> dict:
    pytest.importorskip("keras")
    pytest.importorskip(_MODULE[backend])
    return run_json_worker("_keras_worker.py", ["checks", "{out}", "{tmp}"], worker_env(backend),
                           prefix=f"dualopt-rel-keras-{backend}-", timeout=600)


def keras_result(backend: str, check: str) -> dict:
    """One check's results from ``backend``'s worker; fails (not errors) when the worker crashed."""
    return pick(_run(backend), check)

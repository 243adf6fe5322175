"""The one way the tests run Keras code on a backend: a named function in a fresh interpreter.

Importing Keras with a backend costs 3-8 s and a process holds one backend
(``KERAS_BACKEND`` is read once, as are ``JAX_ENABLE_X64`` and ``XLA_FLAGS``),
so every Keras test that needs a backend calls :func:`launch` (or
:func:`run_checks`): it starts ``python -m tests.keras._launcher`` from the
repository root with ``KERAS_BACKEND`` set, which imports the module, calls
the function with the given arguments and writes what it returns (JSON,
``default=str``, or a pickle for results that hold arrays and tuples). The
functions measure (messages, bit-equality flags, differences); the pytest side
decides pass or fail. Callers cache one launch per backend and pytest worker
(``functools.lru_cache``).

Marks: each backend is its own xdist group so that ``--dist loadgroup`` never
runs one backend's subprocess twice. :func:`worker_backends` (validation,
non-finite) runs every backend in the default run; :func:`keras_backends`
marks tensorflow and torch slow, for suites whose own subprocesses are long
(kill-and-resume, low precision and fuzz).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("jax", "tensorflow", "torch")
DEFAULT_BACKENDS = ("jax",)


@dataclass
class Launched:
    """A finished launch: the exit status, the tail of stderr, and what the function returned (None if nothing)."""

    returncode: int
    stderr: str
    result: Any


def launch(backend: str, target: str, *args: Any, env: Mapping[str, str | None] | None = None,
           timeout: float = 600, result: str = "json") -> Launched:
    """Call ``target`` (``"tests.keras.module:function"``) with ``args`` in a fresh interpreter on ``backend``.

    ``args`` travel as JSON; a string argument ``"{tmp}"`` stands for a scratch
    directory, removed afterwards. ``env`` is added to this process's
    environment (a ``None`` value removes the variable). ``result`` is
    ``"json"`` or ``"pickle"``: how the return value comes back.
    """
    environ = dict(os.environ, KERAS_BACKEND=backend)
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    with tempfile.TemporaryDirectory(prefix=f"dualopt-keras-{backend}-") as tmp:
        out = Path(tmp) / f"result.{result}"
        argv = json.dumps([tmp if a == "{tmp}" else a for a in args])
        proc = subprocess.run([sys.executable, "-m", "tests.keras._launcher", target, str(out), argv], env=environ,
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        value = None
        if out.exists():
            value = json.loads(out.read_text()) if result == "json" else pickle.loads(out.read_bytes())
        return Launched(proc.returncode, proc.stderr[-5000:], value)


def run_checks(backend: str, target: str, *args: Any, env: Mapping[str, str | None] | None = None,
               timeout: float = 600, result: str = "json") -> Any:
    """:func:`launch`, returning the function's result, or ``{"__crash__": ...}`` when the process failed."""
    done = launch(backend, target, *args, env=env, timeout=timeout, result=result)
    if done.returncode != 0 or done.result is None:
        return {"__crash__": f"{target} on {backend}: rc={done.returncode}\n{done.stderr}"}
    return done.result


def run_named(backend: str, checks: Iterable[tuple[str, Callable[[], Any]]]) -> dict[str, Any]:
    """Run in a worker: each check's value, or ``{"__error__": traceback}`` where it raised (so one failing
    check does not hide the others; :func:`pick` turns it into the test's failure), and its seconds."""
    results: dict[str, Any] = {"backend": backend, "seconds": {}}
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"__error__": traceback.format_exc()[-4000:]}
        results["seconds"][name] = round(time.perf_counter() - t0, 2)
    return results


def pick(results: dict, check: str) -> Any:
    """One check's results from a launch's dict; fails (not errors) when the process or the check crashed."""
    assert "__crash__" not in results, results.get("__crash__")
    r = results[check]
    assert not (isinstance(r, dict) and "__error__" in r), r.get("__error__")
    return r


def reliability_env() -> dict[str, str | None]:
    """The environment of the reliability checks: CPU only, quiet TensorFlow, jax's float32 default."""
    return {"TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "JAX_ENABLE_X64": None}


def backend_marks(backend: str) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.xdist_group(f"reliability-keras-{backend}")]
    if backend not in DEFAULT_BACKENDS:
        marks.append(pytest.mark.slow)
    return marks


def keras_backends() -> list:
    return [pytest.param(b, marks=backend_marks(b), id=b) for b in BACKENDS]


def worker_marks(backend: str) -> list[pytest.MarkDecorator]:
    """Marks of a test that reads :func:`keras_result`: its xdist group only (not slow)."""
    return [pytest.mark.xdist_group(f"reliability-keras-{backend}")]


def worker_backends() -> list:
    return [pytest.param(b, marks=worker_marks(b), id=b) for b in BACKENDS]


@functools.lru_cache(maxsize=None)
def _reliability(backend: str) -> dict:
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    return run_checks(backend, "tests.keras._reliability_checks:checks", "{tmp}", env=reliability_env())


def keras_result(backend: str, check: str) -> Any:
    """One check of ``tests/keras/_reliability_checks.py`` on ``backend`` (one launch per backend)."""
    return pick(_reliability(backend), check)


def main(target: str, out: str, argv: str) -> None:
    module, function = target.split(":")
    value = getattr(importlib.import_module(module), function)(*json.loads(argv))
    if out.endswith(".pickle"):
        Path(out).write_bytes(pickle.dumps(value))
    else:
        Path(out).write_text(json.dumps(value, indent=1, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])

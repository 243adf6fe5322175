"""The Keras worker process: one backend per process, a pickled request in, a pickled answer out.

Keras fixes its backend at import, so every Keras row of the suite runs in a
child process with ``KERAS_BACKEND`` set. Two modules need such a child: the
adapter rows (:mod:`.impl_keras`) and the "default settings" case
(:mod:`.defaults`). Each one serves its own requests from its own ``__main__``
through :func:`serve`, and starts its child through :func:`run`, so neither
imports the other.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from typing import Any, Callable

__all__ = ["keras_setup", "run", "serve"]


def keras_setup(dtype: str) -> Any:
    """Import Keras in a worker and set its ``floatx`` (before any optimizer makes its variables)."""
    import keras

    keras.config.set_floatx(dtype)
    return keras


def run(backend: str, module: str, argv: list[str], payload: Any, timeout: float = 1800.0) -> Any:
    """Run ``python -m module *argv IN OUT`` under ``KERAS_BACKEND=backend``; return its unpickled answer.

    The request and answer files live in a fresh private temporary directory.
    A worker that exits non-zero raises with the tail of its stderr; one that
    outlives ``timeout`` seconds is killed (``subprocess.TimeoutExpired``).
    """
    with tempfile.TemporaryDirectory(prefix="dualopt-keras-") as tmp:
        src, dst = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(src, "wb") as fh:
            pickle.dump(payload, fh)
        env = dict(os.environ, KERAS_BACKEND=backend, JAX_ENABLE_X64="1", TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, "-m", module, *argv, src, dst], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"keras[{backend}] worker {module} {' '.join(argv)} failed:\n{proc.stderr[-4000:]}")
        with open(dst, "rb") as fh:
            return pickle.load(fh)


def serve(argv: list[str], worker: Callable[[str, Any], Any]) -> int:
    """The child's side of :func:`run`: ``argv`` is ``COMMAND IN OUT``; answer with ``worker(COMMAND, request)``."""
    command, src, dst = argv
    with open(src, "rb") as fh:
        payload = pickle.load(fh)
    result = worker(command, payload)
    with open(dst, "wb") as fh:
        pickle.dump(result, fh)
    return 0

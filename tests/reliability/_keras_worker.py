"""Keras side of the reliability suite, run in a subprocess with ``KERAS_BACKEND`` set.

``python _keras_worker.py checks OUT.json TMPDIR`` runs every check below and
writes measured values (messages, bit-equality flags, counters) to OUT.json;
the pytest side (``test_reliability_*.py``) decides pass or fail. A check that
raises records ``{"__error__": traceback}``.

``python _keras_worker.py train SPEC.json`` is the training job that the
kill-and-resume check starts (and kills) in its own subprocesses.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import keras  # noqa: E402
from keras import ops  # noqa: E402

import decoupled_core as dc  # noqa: E402
from _reliability_cases import CASES, PARAM_SHAPES, adapter_kwargs  # noqa: E402

BACKEND = keras.backend.backend()
CHECKS: dict[str, Callable[[], Any]] = {}


def check(fn: Callable[[], Any]) -> Callable[[], Any]:
    CHECKS[fn.__name__] = fn
    return fn


def to_numpy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x), copy=True)


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def all_same(xs: list, ys: list) -> bool:
    return len(xs) == len(ys) and all(same_bits(x, y) for x, y in zip(xs, ys))


# --------------------------------------------------------------------------------------------- validation
@check
def validation() -> dict[str, str | None]:
    """Every bad-input case: the message of DualOpt(...) + build(), or None when accepted."""
    from dualopt.keras import DualOpt

    out: dict[str, str | None] = {}
    for case in CASES:
        kw = adapter_kwargs(case, "keras")
        variables = [keras.Variable(np.zeros(s, np.float32), name=n) for s, n in zip(PARAM_SHAPES, "ab")]
        try:
            DualOpt(**kw).build(variables)
            out[case.id] = None
        except Exception as e:  # recorded and asserted on by pytest
            out[case.id] = f"{type(e).__name__}: {e}"
    return out


def main_checks(out_path: str, tmp: str) -> None:
    os.environ["DUALOPT_REL_TMP"] = tmp
    results: dict[str, Any] = {"backend": BACKEND, "seconds": {}}
    for name, fn in CHECKS.items():
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"__error__": traceback.format_exc()[-4000:]}
        results["seconds"][name] = round(time.perf_counter() - t0, 2)
    Path(out_path).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    if sys.argv[1] == "checks":
        main_checks(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")

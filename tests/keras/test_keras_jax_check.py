"""The non-finite check of ``dualopt.keras`` inside a jitted jax step (issue 21).

XLA:CPU compiled the core's ``all(isfinite(g))`` into a pass writing a boolean
array of every gradient's shape plus a window reduction over it, most of
Keras-on-jax's ``nonfinite="skip"`` overhead; the adapter now uses the optax
adapter's exact ``sum(g)`` check there. These tests run in one ``KERAS_BACKEND=jax``
subprocess (``_jax_check_checks.py``) and check the compiled program's structure and the check's exactness
(NaN, Inf, and finite gradients whose float32 sum overflows).
"""

from __future__ import annotations

import functools

import pytest

from tests.keras._launcher import run_checks

pytestmark = [pytest.mark.keras_backend, pytest.mark.xdist_group("keras-jax")]


@functools.lru_cache(maxsize=None)
def results() -> dict:
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "JAX_ENABLE_X64": None}
    r = run_checks("jax", "tests.keras._jax_check_checks:run", env=env, timeout=600)
    assert "__crash__" not in r, r.get("__crash__")
    return r


def test_jitted_check_writes_no_boolean_array_of_a_gradient():
    r = results()
    # The old check wrote pred[64,64] / pred[64] arrays (one per gradient) before reducing them.
    assert r["finite_skip"]["bool_arrays"] == 0
    assert r["finite_propagate"]["bool_arrays"] == 0


def test_jitted_check_is_exact():
    r = results()
    # Finite gradients: skip applies the same update as propagate, bit for bit.
    assert r["finite_skip"]["weights"] == r["finite_propagate"]["weights"]
    assert (r["finite_skip"]["skipped"], r["finite_skip"]["t"]) == (0, 1)
    # A finite gradient whose float32 sum overflows is still finite: applied, not skipped.
    assert r["huge_skip"]["weights"] == r["huge_propagate"]["weights"]
    assert (r["huge_skip"]["skipped"], r["huge_skip"]["t"]) == (0, 1)
    assert r["huge_skip"]["weights"] != r["finite_skip"]["weights"]
    # One NaN or Inf element anywhere: the whole step is skipped and the weights keep their value.
    for bad in ("nan", "inf", "-inf"):
        case = r[f"bad_{bad}"]
        assert (case["skipped"], case["t"]) == (1, 0), bad
        assert all(x == 0.5 for w in case["weights"] for x in (w if isinstance(w[0], float) else sum(w, []))), bad

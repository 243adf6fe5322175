"""The tolerance policy: classes, verdicts, and agreement between the code and spec/TOLERANCES.md."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from dualopt.conformance.metrics import Deviation, compare
from dualopt.conformance.tolerances import (CLASSES, CLOSED, EPS32, EPS64, NATIVE_CLASSES, OPEN, Tolerance, judge,
                                             numerics_class, policy_table, tolerance)

TOLERANCES_MD = Path(__file__).resolve().parents[2] / "spec" / "TOLERANCES.md"


def test_every_class_has_a_tolerance_in_both_dtypes_and_loops():
    for cls in CLASSES:
        assert tolerance(cls, "closed", "float64").budget > 0
        if cls in NATIVE_CLASSES:
            continue  # a framework's own Adam has no open loop
        for dt in ("float64", "float32"):
            tol = tolerance(cls, "open", dt)
            assert tol.per_step and tol.reason
    assert tolerance("exact", "open", "float64").bitwise
    with pytest.raises(ValueError, match="no open-loop tolerance"):
        tolerance("native", "open", "float64")
    with pytest.raises(ValueError, match="loop='sideways' is invalid"):
        tolerance("exact", "sideways", "float64")


def test_non_exact_open_budgets_scale_with_the_dtype():
    for (cls, dt), tol in OPEN.items():
        if not tol.bitwise:
            other = OPEN[(cls, "float32" if dt == "float64" else "float64")]
            assert tol.budget / (EPS64 if dt == "float64" else EPS32) == other.budget / (
                EPS32 if dt == "float64" else EPS64)


def test_judge_per_step_budget_grows_with_t():
    tol = Tolerance(1e-16, True, "test")
    # 2.5e-16 after step 3 is within 3 * 1e-16; the same error after step 2 is not.
    assert judge(Deviation(steps=3, max_ulp=3, scaled=[0.0, 1e-16, 2.5e-16]), tol).status == "pass"
    v = judge(Deviation(steps=3, max_ulp=3, scaled=[0.0, 2.5e-16, 2.5e-16]), tol)
    assert v.status == "FAIL" and "step 2" in v.note and v.ratio == pytest.approx(1.25)
    closed = Tolerance(1e-12, False, "test")
    assert judge(Deviation(steps=3, max_ulp=9, scaled=[1e-13, 9e-13, 1e-12]), closed).ratio == pytest.approx(1.0)
    assert judge(Deviation(steps=3, max_ulp=9, scaled=[1e-13, 9e-13, 1.1e-12]), closed).status == "FAIL"


def test_bitwise_class_fails_on_one_ulp_and_exact_beats_any_class():
    one_ulp = Deviation(steps=1, max_ulp=1.0, scaled=[1e-30])
    assert judge(one_ulp, tolerance("exact", "open", "float64")).status == "FAIL"
    assert judge(one_ulp, tolerance("torch", "open", "float64")).status == "pass"
    assert judge(Deviation(steps=1, scaled=[0.0]), tolerance("torch", "open", "float64")).status == "exact"


def test_problems_and_nan_fail_whatever_the_tolerance():
    ref = [{"w": np.array([1.0, 2.0])}]
    nan = compare([{"w": np.array([1.0, np.nan])}], ref, {"w": np.array([1.0, 2.0])})
    assert nan.problems and "non-finite" in nan.problems[0]
    assert judge(nan, Tolerance(1.0, False, "loose")).status == "FAIL"
    wrong_dtype = compare([{"w": np.array([1.0, 2.0], np.float32)}], ref, {"w": np.array([1.0, 2.0])})
    assert "float32" in wrong_dtype.problems[0]
    missing = compare([], ref, {"w": np.array([1.0, 2.0])})
    assert judge(missing, Tolerance(1.0, False, "loose")).status == "FAIL"
    # Equal infinities and NaN against NaN agree.
    inf = [{"w": np.array([np.inf, np.nan])}]
    assert compare(inf, inf, {"w": np.array([1.0, 1.0])}).exact


def test_scaled_error_is_invariant_under_rescaling():
    rng = np.random.default_rng(0)
    ref = [{"w": rng.standard_normal(5)} for _ in range(3)]
    got = [{"w": np.nextafter(r["w"], np.inf)} for r in ref]
    base = compare(got, ref, {"w": ref[0]["w"]}).scaled
    assert all(s > 0 for s in base)
    for k in (2.0**-50, 2.0**50):  # powers of two rescale exactly, as the tiny/huge vectors do approximately
        scaled = compare([{"w": g["w"] * k} for g in got], [{"w": r["w"] * k} for r in ref], {"w": ref[0]["w"] * k})
        assert scaled.scaled == base


def test_numerics_class_inference_and_declaration():
    assert numerics_class(NS(name="a", framework="core[numpy]")) == "exact"
    assert numerics_class(NS(name="a", framework="torch")) == "torch"
    assert numerics_class(NS(name="a", framework="optax")) == "xla-jit"
    assert numerics_class(NS(name="a", framework="keras[jax]")) == "traced-scalars"
    assert numerics_class(NS(name="a", framework="keras[torch]", numerics="torch")) == "traced-scalars"
    assert numerics_class(NS(name="a", framework="keras[jax]", numerics="native")) == "native-epsilon-hat"
    assert numerics_class(NS(name="a", framework="mlx", numerics="native")) == "native"
    with pytest.raises(ValueError, match="numerics='fuzzy' is invalid"):
        numerics_class(NS(name="a", framework="mlx", numerics="fuzzy"))


def test_tolerances_md_states_the_policy_of_the_code():
    """spec/TOLERANCES.md is the written policy: every class and every budget in the code appears in it."""
    text = TOLERANCES_MD.read_text()
    for cls in CLASSES:
        assert f"`{cls}`" in text, cls
    for row in policy_table():
        line = f"| `{row['class']}` | {row['loop']} | {row['dtype']} | {row['tolerance']} |"
        assert line in text, line
    assert f"{CLOSED['exact'].budget:g}" in text and f"{CLOSED['native-epsilon-hat'].budget:g}" in text

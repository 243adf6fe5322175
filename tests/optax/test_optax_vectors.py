"""The spec's test vectors replayed through dualopt.optax: eagerly, under jax.jit, with x64 on and off.

- ``dualopt.optax.step`` eagerly (no ``updates`` round trip): bit for bit, float64 and float32.
- ``tx.update`` + ``optax.apply_updates`` under ``jax.jit`` and eagerly: within the
  "xla-jit" budget (4 eps per step, scaled error; see ``_optax_helpers``).
- float32 vectors with x64 *off* (float32 bias corrections): same budget.
- the pull rates the transform derives equal the vectors' ``rates`` exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from dualopt.spec.vectors import load_cases

from tests.optax._optax_helpers import XLA_JIT_EPS_PER_STEP, assert_bitwise, assert_within

CASES = list(load_cases())
SUPPORTED = [c for c in CASES if "missing_grads" not in c.features]
IDS = [f"{c.name}.{c.dtype}" for c in SUPPORTED]


def _replay(case, *, mode: str):
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.conformance.impl_optax import case_transform
    from dualopt.optax import step

    tx, params = case_transform(case)
    state = tx.init(params)
    if mode == "step":
        fn = lambda p, s, g: step(tx, g, s, p)  # noqa: E731
    else:
        def fn(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        if mode == "jit":
            fn = jax.jit(fn)
    traj = []
    for grads in case.grads:
        params, state = fn(params, state, {n: jnp.asarray(g) for n, g in grads.items()})
        traj.append({n: np.asarray(v).copy() for n, v in params.items()})
    skipped = sum(1 for g in case.grads if any(v is not None and not np.all(np.isfinite(v)) for v in g.values()))
    assert int(state.skipped) == (skipped if case.nonfinite == "skip" else 0)
    assert int(state.count) == case.steps - int(state.skipped)
    return traj


@pytest.mark.parametrize("case", SUPPORTED, ids=IDS)
def test_step_eager_is_bitwise(case):
    assert_bitwise(case, _replay(case, mode="step"))


@pytest.mark.parametrize("case", SUPPORTED, ids=IDS)
def test_update_under_jit(case):
    assert_within(case, _replay(case, mode="jit"), XLA_JIT_EPS_PER_STEP)


@pytest.mark.parametrize("case", [c for c in SUPPORTED if c.dtype == "float64"],
                         ids=[i for i in IDS if i.endswith("float64")])
def test_update_eager_float64(case):
    assert_within(case, _replay(case, mode="eager"), XLA_JIT_EPS_PER_STEP)


@pytest.mark.parametrize("case", [c for c in SUPPORTED if c.dtype == "float32"],
                         ids=[i for i in IDS if i.endswith("float32")])
def test_float32_without_x64(case):
    import jax

    with jax.enable_x64(False):
        assert_within(case, _replay(case, mode="jit"), XLA_JIT_EPS_PER_STEP)


@pytest.mark.parametrize("case", [c for c in SUPPORTED if c.dtype == "float64"],
                         ids=[i for i in IDS if i.endswith("float64")])
def test_rates_match_vectors(case):
    from dualopt.conformance.impl_optax import case_transform
    from dualopt.optax import layer_rates

    tx, params = case_transform(case)
    rates = layer_rates(tx, params)
    assert {n: rates[n] for n in case.names} == dict(zip(case.names, case.rates))


def test_missing_grads_unsupported():
    """An Optax gradient pytree always has the params' structure: a tensor cannot lack a gradient."""
    from dualopt.conformance.impl_optax import implementations

    missing = [c for c in CASES if "missing_grads" in c.features]
    assert missing
    for impl in implementations():
        for case in missing:
            assert impl.supports(case) is False
        assert impl.replay_cases(missing) == {}

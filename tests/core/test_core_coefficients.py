"""Host scalars of one step: Adam bias corrections and the clipped pull coefficient."""

from __future__ import annotations

import math

import numpy as np
import pytest

import decoupled_core as dc

from tests.core._core_helpers import backend_name, to_numpy


@pytest.mark.parametrize("step", [1, 2, 10, 1000, 10**6])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.5), (0.99, 0.9999)])
def test_adam_coefficients_are_the_float64_host_formula(step, betas):
    b1, b2 = betas
    lr = 3e-4
    c = dc.adam_coefficients(lr, b1, b2, step)
    assert isinstance(c.step_size, float) and isinstance(c.inv_sqrt_bc2, float)
    assert c.step_size == lr / (1.0 - b1**step)
    assert c.inv_sqrt_bc2 == 1.0 / math.sqrt(1.0 - b2**step)


def test_adam_coefficients_first_step_values():
    c = dc.adam_coefficients(1e-3, 0.9, 0.999, 1)
    # (1 - 0.9) and (1 - 0.999) are not exactly 0.1 / 0.001 in binary; check against high precision.
    assert c.step_size == pytest.approx(1e-2, rel=1e-15)
    assert c.inv_sqrt_bc2 == pytest.approx(1.0 / math.sqrt(1e-3), rel=1e-12)


def test_adam_coefficients_approach_plain_lr():
    c = dc.adam_coefficients(0.5, 0.9, 0.999, 10**7)
    assert c.step_size == 0.5 and c.inv_sqrt_bc2 == 1.0


def test_adam_coefficients_with_traced_learning_rate(xp):
    """A 0-d learning rate (what jit traces) gives the host value (float64 0-d arrays, same IEEE ops)."""
    lr = xp.asarray(2e-3, dtype=xp.float64)
    c = dc.adam_coefficients(lr, 0.9, 0.999, 3)
    host = dc.adam_coefficients(2e-3, 0.9, 0.999, 3)
    assert float(to_numpy(c.step_size)) == host.step_size
    assert c.inv_sqrt_bc2 == host.inv_sqrt_bc2


@pytest.mark.parametrize(("lr", "rate", "expected"), [
    (0.1, 0.5, 0.1 * 0.5),
    (0.0, 7.0, 0.0),
    (0.1, 0.0, 0.0),
    (2.0, 1.0, 1.0),      # clipped from above: lands on the anchor
    (1.0, 1.0, 1.0),
    (1e-3, 1e4, 1.0),
    (-0.5, 1.0, 0.0),     # clipped from below (a negative schedule value never pushes away)
])
def test_pull_coefficient_clips_to_unit_interval(lr, rate, expected):
    c = dc.pull_coefficient(lr, rate)
    assert isinstance(c, float)
    assert c == expected


def test_pull_coefficient_is_float64_product_before_clipping():
    lr, rate = 0.1, 0.3
    assert dc.pull_coefficient(lr, rate) == lr * rate  # not rounded to any array dtype on the host


def test_pull_coefficient_with_traced_values(xp):
    for lr, rate, expected in [(0.1, 0.5, 0.1 * 0.5), (2.0, 1.0, 1.0), (-1.0, 1.0, 0.0)]:
        # (numpy turns a 0-d product into an np.float64 scalar, which the core treats as a host float)
        c = dc.pull_coefficient(xp.asarray(lr, dtype=xp.float64), rate)
        assert float(to_numpy(c)) == expected, backend_name(xp)


def test_pull_coefficient_integer_inputs_become_float():
    c = dc.pull_coefficient(1, 0)
    assert c == 0.0 and isinstance(c, float)


def test_zero_host_rate_gives_host_zero_with_traced_lr(xp):
    """rho == 0 is known on the host, so c is the host 0.0 (pull skipped) even when lr is traced (spec 4.2)."""
    c = dc.pull_coefficient(xp.asarray(0.1, dtype=xp.float64), 0.0, xp=xp)
    assert type(c) is float and c == 0.0


def test_traced_coefficients_with_explicit_namespace(xp):
    """The optional ``xp`` is the namespace the scalars' arrays belong to (no array-api-compat lookup needed)."""
    lr = xp.asarray(0.5, dtype=xp.float64)
    step = xp.asarray(2.0, dtype=xp.float64)
    c = dc.adam_coefficients(lr, 0.9, 0.999, step, xp=xp)
    host = dc.adam_coefficients(0.5, 0.9, 0.999, 2)
    # beta ** t on a traced t is the namespace's pow: allowed to differ from the host in the last bit.
    assert float(to_numpy(c.step_size)) == pytest.approx(host.step_size, rel=4e-16)
    assert float(to_numpy(c.inv_sqrt_bc2)) == pytest.approx(host.inv_sqrt_bc2, rel=4e-16)
    assert float(to_numpy(dc.pull_coefficient(lr, 3.0, xp=xp))) == 1.0


# ------------------------------------------------------------ bias corrections of a traced step

T_STEPS = list(range(1, 300)) + [1000, 4096, 10_000, 123_457]


def test_traced_float64_bias_corrections_are_the_host_values(xp):
    """``dtype=float64``: the host expression ``1 - beta**t`` on device arrays. jax's ``pow`` (XLA's) gives the
    host's bits; numpy's (and so array-api-strict's) is 1 ulp off C's ``pow`` for some t, which the cancellation
    in ``1 - beta**t`` magnifies, and torch's ``sqrt`` is not correctly rounded on CPU (FIELD_NOTES): those are
    held to that ulp of ``beta**t`` relative to ``1 - beta**t``, plus 2 ulp."""
    steps = xp.asarray(T_STEPS, dtype=xp.int32)
    c = dc.adam_coefficients(1e-3, 0.9, 0.999, steps, xp=xp, dtype=xp.float64)
    got = np.stack([to_numpy(c.step_size), to_numpy(c.inv_sqrt_bc2)], axis=1)
    host = np.array([dc.adam_coefficients(1e-3, 0.9, 0.999, t) for t in T_STEPS])
    assert got.dtype == np.float64
    if backend_name(xp) == "jax":
        np.testing.assert_array_equal(got, host)
    else:
        bc = np.array([[1 - 0.9**t, 1 - 0.999**t] for t in T_STEPS])
        assert (np.abs(got / host - 1) <= 1.2e-16 / bc + 4.5e-16).all()

@pytest.mark.parametrize("b1,b2", [(0.9, 0.999), (0.5, 0.9999), (0.0, 0.99)])
def test_traced_float32_bias_corrections_within_3_ulp(xp, b1, b2):
    """``dtype=float32``: ``-expm1(t * log(beta))``, within 3 float32 ulp of the host's float64 values rounded
    to float32 (the direct ``1 - b2**t`` in float32 is 1e-4 off for b2 = 0.9999)."""
    ts = np.unique(np.geomspace(1, 200_000, 3000).astype(np.int32))
    c = dc.adam_coefficients(1e-3, b1, b2, xp.asarray(ts), xp=xp, dtype=xp.float32)
    got = [to_numpy(x) for x in c]
    assert got[0].dtype == np.float32 and got[1].dtype == np.float32
    host = np.array([dc.adam_coefficients(1e-3, b1, b2, int(t)) for t in ts]).astype(np.float32)
    for g, h in zip(got, host.T):
        ulp = np.abs(g.view(np.int32).astype(np.int64) - h.view(np.int32).astype(np.int64))
        assert ulp.max() <= 3, ulp.max()
    assert math.isfinite(float(got[1][-1]))


def test_traced_bias_correction_of_a_traced_beta(xp):
    """A beta that is itself an array (``optax.inject_hyperparams``) keeps its dtype on the float64 path and is
    cast on the float32 path."""
    t = xp.asarray(7, dtype=xp.int32)
    beta = xp.asarray(0.99, dtype=xp.float64)
    assert float(to_numpy(dc.bias_correction(beta, t, dtype=xp.float64, xp=xp))) == pytest.approx(1 - 0.99**7,
                                                                                                   rel=1e-15)
    low = dc.bias_correction(xp.asarray(0.99, dtype=xp.float32), t, dtype=xp.float32, xp=xp)
    assert to_numpy(low).dtype == np.float32
    assert float(to_numpy(low)) == pytest.approx(1 - 0.99**7, rel=1e-6)
    assert float(to_numpy(dc.bias_correction(0.0, t, dtype=xp.float32, xp=xp))) == 1.0

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

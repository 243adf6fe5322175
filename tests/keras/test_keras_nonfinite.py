"""Non-finite gradients inside Keras's ``model.fit`` train step, on every backend (spec section 8).

``_reliability_checks.py``'s ``nonfinite_fit`` check (one subprocess per backend,
shared with the bad-input table; about 30 s per backend, so every backend is
in the default run) trains a float32 two-layer model
twice with ``model.fit``: once on four clean batches, once with bad copies of
some batches inserted (one input element set to NaN, +Inf or -Inf, so the
batch's gradient is non-finite), two epochs each. A callback snapshots every
model and optimizer variable after every batch. Asserted here:

- each bad batch leaves the weights and every optimizer variable (m and v or
  the momentum buffer, anchors, ``step`` t, EMA averages, learning rate,
  layout) bit-identical, raises ``skipped`` by one and advances
  ``iterations`` by one (it counts batches: documented in ``dualopt.keras``);
- after every clean batch the run with bad batches equals the clean run bit
  for bit, and so do the weights after ``fit`` (where Keras has overwritten
  them with the EMA average);
- clean batches do change the state, so "unchanged" is not vacuous;
- ``nonfinite="propagate"`` lets the NaN reach the weights and counts nothing.

Set-ups, both with ``use_ema``: Adam with a finetune backbone and a scratch
head, bad copies inserted after clean batches; and Nesterov SGD whose very
first batch is bad. The second guards a trap: Keras creates the EMA average as
zeros and copies the weights into it (momentum 0) when ``iterations == 0``;
once that first batch is skipped, plain Keras would start averaging from
zeros (0.9 * 0 + 0.1 * w), so DualOpt treats the first *applied* batch as
the first.
"""

from __future__ import annotations

import pytest

from tests.keras._launcher import keras_result, worker_backends

pytestmark = pytest.mark.keras_backend

SETUPS = {"adam-ema": 6, "sgd-first-bad": 4}  # set-up -> bad batches over the two epochs


@pytest.mark.parametrize("backend", worker_backends())
@pytest.mark.parametrize("setup", list(SETUPS))
def test_bad_batches_in_fit_change_nothing_and_training_resumes_exactly(backend, setup):
    r = keras_result(backend, "nonfinite_fit")[setup]
    assert r["batches"] == r["expected_batches"]
    assert r["clean_before_equal"]
    assert len(r["injections"]) == SETUPS[setup]
    assert {i["value"] for i in r["injections"]} == ({"nan", "inf", "-inf"} if setup == "adam-ema" else {"nan", "-inf"})
    for inj in r["injections"]:
        assert inj["unchanged"], inj
        assert inj["skipped_delta"] == 1 and inj["iterations_delta"] == 1, inj
    assert r["trajectory_bitwise"] == [True] * 8
    assert r["clean_batches_change_state"] == [True] * 8
    assert r["final_weights_bitwise"]
    assert (r["skipped"], r["clean_skipped"]) == (SETUPS[setup], 0)
    assert r["step_count"] == r["clean_step_count"] == 8
    assert r["iterations"] == 8 + SETUPS[setup]


@pytest.mark.parametrize("backend", worker_backends())
def test_propagate_lets_nan_through_fit(backend):
    r = keras_result(backend, "nonfinite_fit")["propagate"]
    assert r == {"weights_have_nan": True, "skipped": 0, "step_count": 1}

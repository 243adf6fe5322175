"""Bad hyperparameters, layer keys, anchors and states: every adapter fails loudly, in the core's words.

One table (``tests.common.cases.CASES``) is tried on every adapter: torch and
Optax in this process, Keras in one subprocess per backend
(``tests/keras/_reliability_checks.py``, about 30 s per backend, all three in the default run).
For each case the adapter's message must be the core's message for the
same case, word for word, with the adapter's public argument names
(``betas[0]``, ``b1``, ``beta_1``): :func:`decoupled_core.validate` for
hyperparameters, :func:`decoupled_core.number_layers` for layer keys and
:func:`decoupled_core.check_anchor` for anchors. Layer-key and anchor messages
may index into the argument (``anchor['0.weight']``, ``layer_index[1]``):
only the text after the name is compared. Where an adapter accepts more than
the core's range (an Optax schedule, a Keras ``LearningRateSchedule``, a
mapping of paradigms), the core appends those forms itself
(``decoupled_core.accepted``); the expected forms are written out in
``tests.common.cases.ALSO_ACCEPTED``.

A saved state that belongs to another optimizer, model, paradigm or direction
(``kind="state"``) has no core message (each framework has its own state
format): it must raise in the shared ``"<name>=<value> is invalid: expected
<accepted>."`` form naming the adapter's state argument, and leave the
optimizer's state bit-identical (torch ``load_state_dict``, Keras
``load_own_variables``); for Optax (a state is a value) the same error must
come from the jitted update, at trace time.

Known adapter deviations would be ``xfail(strict=True)`` with the reason,
listed in ``KNOWN_BUGS`` (an xfail that starts passing fails the run, so the
list stays honest). It is empty: every adapter passes every case.
"""

from __future__ import annotations

import re

import pytest

from tests.common.adapters import construct_optax, construct_torch, error_text, load_optax_state, load_torch_state
from tests.common.cases import CASES, core_message, public_argument, split_message
from tests.keras._launcher import BACKENDS, keras_result, worker_marks

#: (adapter, case id) -> why the adapter's message is not the core's (routed to the adapter's owner).
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _param(adapter: str, case_id: str, *marks: pytest.MarkDecorator) -> pytest.param:
    reason = KNOWN_BUGS.get((adapter.split("-")[0], case_id))
    extra = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case_id, marks=[*marks, *extra], id=f"{adapter}-{case_id}")


BY_ID = {c.id: c for c in CASES}


def assert_core_wording(adapter: str, case_id: str, result: str | None) -> None:
    case = BY_ID[case_id]
    kind, msg = error_text(result)
    if case.kind == "state":
        assert msg is not None, f"{adapter} loaded the state of {case_id}"
        assert kind == "HyperparameterError", f"{adapter} raised {kind}: {msg}"
        name, rest = split_message(msg)
        assert name.startswith(public_argument(case, adapter.split("-")[0])), msg
        assert re.fullmatch(r"\S.* is invalid: expected \S.*\.", rest, re.S), msg
        return
    expected = core_message(case, adapter.split("-")[0])
    assert msg is not None, f"{adapter} accepted {case_id}; the core says: {expected}"
    assert kind == "HyperparameterError", f"{adapter} raised {kind}: {msg}"
    if case.kind == "hyper":
        assert msg == expected
    else:
        name, rest = split_message(msg)
        argument = public_argument(case, adapter.split("-")[0])
        assert name == argument or name.startswith(argument + "["), msg
        assert rest == split_message(expected)[1], f"\n got: {msg}\nwant: {expected}"


@pytest.mark.parametrize("case_id", [_param("torch", c.id) for c in CASES])
def test_torch_rejects_in_core_words(case_id):
    pytest.importorskip("torch")
    case = BY_ID[case_id]
    if case.kind == "state":
        msg, untouched = load_torch_state(case)
        assert_core_wording("torch", case_id, msg)
        assert untouched, "a refused load_state_dict changed the optimizer's state"
    else:
        assert_core_wording("torch", case_id, construct_torch(case))


@pytest.mark.parametrize("case_id", [_param("optax", c.id) for c in CASES])
def test_optax_rejects_in_core_words(case_id):
    pytest.importorskip("optax")
    case = BY_ID[case_id]
    if case.kind == "state":
        msg, same_under_jit = load_optax_state(case)
        assert_core_wording("optax", case_id, msg)
        assert same_under_jit, "jax.jit(tx.update) did not raise the eager message at trace time"
    else:
        assert_core_wording("optax", case_id, construct_optax(case))


def _keras_params() -> list:
    out = []
    for backend in BACKENDS:
        for c in CASES:
            reason = KNOWN_BUGS.get(("keras", c.id))
            marks = worker_marks(backend) + ([pytest.mark.xfail(strict=True, reason=reason)] if reason else [])
            out.append(pytest.param(backend, c.id, marks=marks, id=f"{backend}-{c.id}"))
    return out


@pytest.mark.keras_backend
@pytest.mark.parametrize(("backend", "case_id"), _keras_params())
def test_keras_rejects_in_core_words(backend, case_id):
    if BY_ID[case_id].kind == "state":
        r = keras_result(backend, "state_loads")[case_id]
        assert_core_wording(f"keras-{backend}", case_id, r["message"])
        assert r["untouched"], "a refused load_own_variables changed the optimizer's variables"
    else:
        assert_core_wording(f"keras-{backend}", case_id, keras_result(backend, "validation")[case_id])


def test_the_table_covers_issue_8():
    """Every kind of bad input that issue 8 lists has at least one case (ids are '<argument>-<what>')."""
    ids = {c.id for c in CASES}
    wanted = ["lr-negative", "lr-nan", "lr-inf", "weight_decay-negative", "rollback_max-inf", "beta1-one",
              "beta2-negative", "direction-unknown", "paradigm-unknown", "rollback_min-above-max",
              "rollback_power-zero", "rollback_power-negative", "pull-lr-times-weight_decay",
              "pull-lr-times-rollback_max", "layer_index-negative", "layer_index-too-long", "layer_index-nested",
              "anchor-shape", "anchor-dtype-float64", "state-other-optimizer", "state-other-model",
              "state-other-paradigm", "state-other-direction"]
    assert not [w for w in wanted if w not in ids]
    assert {c.kind for c in CASES} == {"hyper", "layer_index", "anchor", "state"}

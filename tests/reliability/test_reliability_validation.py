"""Bad hyperparameters, layer keys and anchors: every adapter fails loudly, in the core's words.

One table (``_reliability_cases.CASES``) is tried on every adapter: torch and
Optax in this process, Keras in one subprocess per backend
(``_keras_worker.py``; jax in the default run, tensorflow and torch marked
slow). For each case the adapter's message must be the core's message for the
same case, word for word, with the adapter's public argument names
(``betas[0]``, ``b1``, ``beta_1``): :func:`decoupled_core.validate` for
hyperparameters, :func:`decoupled_core.number_layers` for layer keys and
:func:`decoupled_core.check_anchor` for anchors. Layer-key and anchor messages
may index into the argument (``anchor['0.weight']``, ``layer_index[1]``):
only the text after the name is compared.

Known adapter deviations are ``xfail(strict=True)`` with the reason, listed in
``KNOWN_BUGS`` (an xfail that starts passing fails the run, so the list stays
honest).
"""

from __future__ import annotations

import pytest

from _reliability_adapters import construct_optax, construct_torch, error_text
from _reliability_cases import CASES, core_message, public_argument, split_message
from _reliability_keras import BACKENDS, backend_marks, keras_result

#: (adapter, case id) -> why the adapter's message is not the core's (routed to the adapter's owner).
KNOWN_BUGS: dict[tuple[str, str], str] = {}

_LAYER_CASES = ("layer_index-negative", "layer_index-float", "layer_index-string", "layer_index-bool",
                "layer_index-too-long", "layer_index-too-short")
_ANCHOR_SHAPE = ("anchor-shape", "anchor-shape-transposed")
_ANCHOR_DTYPE = ("anchor-dtype-float64", "anchor-dtype-float16", "anchor-dtype-int32")
_WORDING = ("own wording instead of the core's (call decoupled_core.number_layers(..., name=...) on the final keys, "
            "or use its exact words: 'a non-negative integer layer key for every tensor', "
            "'one layer index per parameter tensor (N)')")
for _adapter in ("torch", "optax", "keras"):
    for _c in _LAYER_CASES:
        KNOWN_BUGS[(_adapter, _c)] = f"{_adapter}: layer_index error in its " + _WORDING
for _adapter in ("optax", "keras"):
    for _c in _ANCHOR_SHAPE:
        KNOWN_BUGS[(_adapter, _c)] = (f"{_adapter}: anchor shape error in its own wording instead of "
                                      "decoupled_core.check_anchor's")
for _c in _ANCHOR_DTYPE:
    KNOWN_BUGS[("optax", _c)] = ("optax: an anchor of another dtype (float64, float16, int32 for float32 params) is "
                                 "accepted and cast silently; spec/issue 8: reject it (decoupled_core.check_anchor)")
    KNOWN_BUGS[("keras", _c)] = ("keras: an anchor of another dtype (float64, float16, int32 for float32 variables) "
                                 "is accepted and cast silently; spec/issue 8: reject it (decoupled_core.check_anchor)")
for _adapter, _extra in (("optax", "', a 0-d array or an optax schedule'"), ("keras", "' or a LearningRateSchedule'")):
    for _c in ("lr-bool", "lr-string"):
        KNOWN_BUGS[(_adapter, _c)] = (f"{_adapter}: a non-number learning_rate gets its own accepted-text (adds "
                                      f"{_extra}) instead of validate's 'a finite float >= 0'")
for _c in ("paradigm-unknown", "paradigm-empty"):
    KNOWN_BUGS[("keras", _c)] = ("keras: an unknown paradigm string gets its own accepted-text (adds ', a mapping or "
                                 "a callable') instead of validate's")
for _c, _what in (("beta1-bool", "b1=True (trains to NaN)"), ("weight_decay-bool", "weight_decay=True"),
                  ("rollback_power-bool", "rollback_power=True"), ("beta2-string", "b2='0.999' (accepted by "
                                                                   "dualopt()/init, TypeError at the first update)")):
    KNOWN_BUGS[("optax", _c)] = (f"optax: {_what} is accepted: _validate_once replaces bools and strings by "
                                 "placeholders instead of letting validate reject them")


def _param(adapter: str, case_id: str, *marks: pytest.MarkDecorator) -> pytest.param:
    reason = KNOWN_BUGS.get((adapter.split("-")[0], case_id))
    extra = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case_id, marks=[*marks, *extra], id=f"{adapter}-{case_id}")


BY_ID = {c.id: c for c in CASES}


def assert_core_wording(adapter: str, case_id: str, result: str | None) -> None:
    case = BY_ID[case_id]
    kind, msg = error_text(result)
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
    assert_core_wording("torch", case_id, construct_torch(BY_ID[case_id]))


@pytest.mark.parametrize("case_id", [_param("optax", c.id) for c in CASES])
def test_optax_rejects_in_core_words(case_id):
    pytest.importorskip("optax")
    assert_core_wording("optax", case_id, construct_optax(BY_ID[case_id]))


def _keras_params() -> list:
    out = []
    for backend in BACKENDS:
        for c in CASES:
            reason = KNOWN_BUGS.get(("keras", c.id))
            marks = backend_marks(backend) + ([pytest.mark.xfail(strict=True, reason=reason)] if reason else [])
            out.append(pytest.param(backend, c.id, marks=marks, id=f"{backend}-{c.id}"))
    return out


@pytest.mark.keras_backend
@pytest.mark.parametrize(("backend", "case_id"), _keras_params())
def test_keras_rejects_in_core_words(backend, case_id):
    assert_core_wording(f"keras-{backend}", case_id, keras_result(backend, "validation")[case_id])

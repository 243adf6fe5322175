"""Issue 18 in the Keras adapter (one backend, jax, in a subprocess): public layer_rates(), eta_0 of a
warm-up schedule, the weight_decay=0 warning. The three backends' default numbering is checked against
torch and optax by the conformance case (tests/conformance/test_conformance_defaults.py).

Old code: ``layer_rates`` did not exist (AttributeError), ``CosineDecay(0.0, warmup_target=...)`` with the
default rollback_max was refused at build, and ``base_learning_rate`` was an unknown argument."""

from __future__ import annotations

import pytest

from tests.keras._launcher import run_checks

pytestmark = pytest.mark.keras_backend


@pytest.fixture(scope="module")
def found() -> dict:
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    r = run_checks("jax", "tests.keras._defaults_checks:run", env={"TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert "__crash__" not in r, r.get("__crash__")
    return r


def test_layer_rates_is_public_and_gives_the_issue_table(found):
    assert found["table"] == [10.0, 6.666666666666668, 3.333333333333334, 0.0]
    assert [p.split("/")[-1] for p in found["paths"]] == ["kernel", "bias", "kernel", "bias"]
    assert "build" in found["unbuilt"]


def test_warmup_from_zero_uses_the_schedule_peak(found):
    assert found["warmup_kappa"] == 0.01 / 2e-3
    assert found["explicit_kappa"] == 0.01 / 4e-3
    assert "base_learning_rate=<the schedule's peak" in found["no_peak"]
    assert found["config_base"] == 2e-3


def test_zero_weight_decay_warns_only_without_scratch_variables(found):
    assert len(found["warnings"]) == 1 and "rollback_max" in found["warnings"][0]

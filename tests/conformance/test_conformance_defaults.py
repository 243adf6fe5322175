"""The conformance case "same architecture, default settings" (conformance/defaults.py).

Before issue 18 the optax rows failed: its default numbering followed the
flattened Flax tree (bias before kernel), so the rate table was a permutation
of torch's (test_optax_rows_pass fails on the old adapter with a "rates" note),
and Keras had no layer_rates() (every keras row failed with AttributeError).
"""

from __future__ import annotations

import numpy as np
import pytest

from dualopt.conformance import defaults


def test_reference_tables_are_the_canonical_ramps():
    from decoupled_core import finetune_rate, scratch_rate

    # rollback_max default: 0.01 / lr = 1.0; weight_decay default 1e-2; one layer per tensor, canonical order
    assert defaults.reference("mlp", "finetune")["rates"] == [finetune_rate(k, 4, 1.0, 0.0, 1.0) for k in range(4)]
    assert defaults.reference("convnorm", "scratch")["rates"] == [scratch_rate(k, 6, 1e-2) for k in range(6)]


def test_a_permuted_numbering_fails_the_case():
    """What the old optax default gave: kernel and bias swapped within each module."""
    ref = defaults.reference("mlp", "finetune")
    wrong = dict(ref, rates=[ref["rates"][i] for i in (1, 0, 3, 2)])
    ok, err, note = defaults._compare(ref, wrong)
    assert not ok and err == float("inf") and note.startswith("rates")
    moved = dict(ref, weights=[{n: w * (1 + 1e-9) for n, w in step.items()} for step in ref["weights"]])
    ok, err, _ = defaults._compare(ref, moved)
    assert not ok and 1e-10 < err < 1e-8


@pytest.mark.parametrize("framework", ["torch", "optax"])
def test_torch_and_optax_rows_pass(framework):
    pytest.importorskip({"torch": "torch", "optax": "optax"}[framework])
    result = defaults.check_defaults(lambda name: name == framework)
    assert len(result.rows) == 4 and result.ok, defaults.render(result)
    assert all(r["err"] < defaults.RTOL for r in result.rows)
    finetune_mlp = next(r for r in result.rows if r["model"] == "mlp" and r["paradigm"] == "finetune")
    assert finetune_mlp["rates"] == defaults.reference("mlp", "finetune")["rates"]


@pytest.mark.keras_backend
def test_keras_jax_rows_pass():
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    result = defaults.check_defaults(lambda name: name == "keras[jax]")
    assert len(result.rows) == 4 and result.ok, defaults.render(result)


@pytest.mark.slow
@pytest.mark.keras_backend
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_keras_other_backend_rows_pass(backend):
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    result = defaults.check_defaults(lambda name: name == f"keras[{backend}]")
    assert len(result.rows) == 4 and result.ok, defaults.render(result)


def test_a_failing_row_fails_the_suite(monkeypatch, capsys):
    """``python -m dualopt.conformance`` exits 1 when the defaults case fails, even if everything else passes."""
    from dualopt.conformance import __main__ as cli

    failing = defaults.DefaultsResult(rows=[dict(framework="optax", model="mlp", paradigm="finetune",
                                                 verdict="FAIL", err=np.inf, note="rates differ")])
    monkeypatch.setattr(defaults, "check_defaults", lambda selected, progress=None: failing)
    code = cli.main(["--backends", "numpy", "--only", "closed", "--quiet", "--report", ""])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL     optax" in out and "defaults: 0 passed, 1 failed" in out

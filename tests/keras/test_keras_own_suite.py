"""Keras's own optimizer tests (from the installed wheel) pass against ``dualopt.keras.DualOpt``.

``_keras_suite.py`` runs, in one subprocess per backend, Keras 3's
``optimizers/optimizer_test.py`` with ``optimizers.SGD`` / ``optimizers.Adam``
standing for DualOpt in each paradigm (pull switched off, so Keras's expected
values hold), and with finetune also ``optimizer_sparse_test.py``,
``loss_scale_optimizer_test.py`` and four callback test modules. The jax run
covers the three paradigms; the tensorflow run (finetune) adds
``tf.IndexedSlices``, ``tf.train.Checkpoint``, ``tf.Variable`` and
``tf.distribute``. Every skip carries its one-line reason: DualOpt's (``SKIPS``
in ``_keras_suite.py``) or Keras's own backend conditions.

Measured here (2 shared cores, load ~5): jax about 2.5 min, tensorflow about 45 s.
"""

from __future__ import annotations

import functools
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.keras._launcher import launch
#: Skips decided by Keras's own tests for a backend (their reason as Keras words it).
KERAS_OWN_SKIPS = {"Requires TF", "LossScaleOptimizer must use stateless_apply with JAX.",
                   "The tf.Variable test can only run with TensorFlow backend.",
                   "The distribute test can only run with TF backend.",
                   "stateless_apply is not supported with the TF backend."}
EXPECTED_RUNS = {"jax": ("none", "scratch", "finetune"), "tensorflow": ("finetune",)}

pytestmark = pytest.mark.keras_backend


@functools.lru_cache(maxsize=None)
def suite(backend: str) -> dict[str, dict[str, tuple[str, str]]]:
    """{paradigm: {test name: (outcome, message)}} from the subprocess's JUnit files."""
    pytest.importorskip("keras")
    pytest.importorskip(backend)
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "JAX_ENABLE_X64": None}  # Keras's tests expect float32 defaults
    with tempfile.TemporaryDirectory(prefix=f"dualopt-keras-suite-{backend}-") as tmp:
        proc = launch(backend, "tests.keras._keras_suite:main", tmp, env=env, timeout=900)
        out: dict[str, dict[str, tuple[str, str]]] = {}
        for xml in sorted(Path(tmp).glob("*.xml")):
            cases = {}
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for child in case:
                    if child.tag in ("skipped", "failure", "error"):
                        outcome, message = child.tag, child.get("message") or (child.text or "")[-2000:]
                cases[f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"] = (outcome, message)
            out[xml.stem] = cases
    if not out:
        pytest.fail(f"keras suite [{backend}] wrote no results (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def _params():
    return [pytest.param(b, marks=pytest.mark.xdist_group(f"keras-{b}")) for b in EXPECTED_RUNS]


@pytest.mark.parametrize("backend", _params())
def test_keras_own_optimizer_tests_pass_or_skip_with_a_reason(backend):
    runs = suite(backend)
    assert tuple(sorted(runs)) == tuple(sorted(EXPECTED_RUNS[backend]))
    for paradigm, cases in runs.items():
        bad = {n: m[:300] for n, (o, m) in cases.items() if o in ("failure", "error")}
        assert bad == {}, (paradigm, bad)
        for name, (outcome, message) in cases.items():
            if outcome == "skipped":
                assert message.startswith("DualOpt: ") or message in KERAS_OWN_SKIPS, (paradigm, name, message)
                assert "\n" not in message.strip(), (name, message)
        passed = {n.split("::")[1] for n, (o, _) in cases.items() if o == "passed"}
        # Generic behaviour every optimizer must have, with DualOpt in every paradigm:
        for name in ("test_iterations_counter", "test_empty_gradients", "test_clip_norm", "test_ema",
                     "test_gradient_accumulation", "test_set_weights", "test_callable_learning_rate",
                     "test_overwrite_with_gradient_with_gradient_accumulation", "test_static_loss_scaling",
                     "test_optimizer_auto_naming", "test_pickleable_optimizers0", "test_pickleable_optimizers1",
                     "test_gradient_accumulation_with_weigth_decay0", "test_ema_with_model_fit",
                     "test_constraints_are_applied"):
            assert name in passed, (paradigm, name, cases.get(name))
    finetune = {n.split("::")[1] for n, (o, _) in runs["finetune"].items() if o == "passed"}
    for name in ("test_sparse_correctness_adam", "test_sparse_correctness_sgd_momentum_nesterov",
                 "test_sparse_gradients_adam", "test_swap_ema_weights", "test_TerminateOnNaN",
                 "test_updates_learning_rate", "test_serialization"):
        assert name in finetune, name
    if backend == "tensorflow":  # issue 19 K2 (tf.train.Checkpoint) and tf.Variables mixed in
        assert {"test_tf_checkpointing", "test_mixed_with_tf_variables"} <= finetune
    if backend == "jax":  # stateless LossScaleOptimizer around DualOpt
        assert {"test_finite_step_stateless", "test_infinite_step_stateless", "test_upscaling_stateless"} <= finetune

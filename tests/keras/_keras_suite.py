"""Keras's own optimizer tests, imported from the installed wheel, run against ``dualopt.keras.DualOpt``.

:func:`main` is launched per backend by ``test_keras_own_suite.py``
(``_launcher``), which asserts on the JUnit XML files written to ``OUT_DIR``
(one per paradigm; also the working directory of Keras's tests).

Keras's tests build ``optimizers.SGD(...)`` and ``optimizers.Adam(...)`` (and
``"sgd"`` / ``"adam"`` by name). Here those names are classes that *are*
DualOpt (``direction="sgd"`` / ``"adam"``), with Keras's defaults
(SGD: lr 0.01, no momentum; Adam: lr 0.001, epsilon 1e-7) and the paradigm of
the run: ``none``, ``scratch`` with ``weight_decay=0`` and ``finetune`` with
``rollback_max=0``. A zero pull keeps the values Keras's tests expect (plain
SGD's and Adam's) while every paradigm's own path runs (scratch's pull
coefficient, finetune's anchors); the pulls themselves are checked against the
spec vectors elsewhere. Keras's tests are run unchanged; a test that cannot
apply to DualOpt is skipped with its reason (``SKIPS``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

import keras  # noqa: E402  (backend chosen by KERAS_BACKEND)
from keras.src import optimizers as keras_optimizers
from keras.src.optimizers import adam as keras_adam
from keras.src.optimizers import sgd as keras_sgd

from dualopt.keras import DualOpt

PARADIGMS = ("none", "scratch", "finetune")
#: Each paradigm with its pull switched off (module docstring).
PULL_OFF = {"none": {"paradigm": "none"}, "scratch": {"paradigm": "scratch", "weight_decay": 0.0},
            "finetune": {"paradigm": "finetune", "rollback_max": 0.0}}
PARADIGM = "none"  # set by main() for each run

_KERAS = os.path.dirname(os.path.dirname(keras_optimizers.__file__))  # keras/src
FILES = [os.path.join(_KERAS, "optimizers", f) for f in (
    "optimizer_test.py", "optimizer_sparse_test.py", "loss_scale_optimizer_test.py")] + [
    os.path.join(_KERAS, "callbacks", f) for f in (
        "learning_rate_scheduler_test.py", "reduce_lr_on_plateau_test.py", "swap_ema_weights_test.py",
        "terminate_on_nan_test.py")]

_OTHER = "runs another Keras optimizer, which DualOpt does not stand in for"
_DENSE = ("expects plain SGD's sparse scatter update of the model variable; DualOpt's rule is dense (every row's "
          "momentum and pull), so it updates every row")
#: (regular expression matched against the test's name, reason): the first match skips the test.
SKIPS = [
    # Parametrized over Keras's registry: 0 and 1 are "adam" and "sgd" (DualOpt here), 2-10 are not.
    (r"test_(gradient_accumulation_with_weigth_decay|pickleable_optimizers)([2-9]|10)$", _OTHER),
    (r"test_sparse_\w+_adam_amsgrad$", "DualOpt has no amsgrad"),
    (r"test_sparse_\w+_(adadelta|adafactor|adagrad|adamax|adamw|adamw_amsgrad|ftrl|lion|nadam|rmsprop\w*)$", _OTHER),
    (r"test_sparse_\w+_scatter_update$", "Keras's own test optimizer, not DualOpt"),
    (r"test_sparse_gradients_(sgd|loss_scale_optimizer_sgd)$", _DENSE),
]
#: The same, for one backend only.
BACKEND_SKIPS = {"tensorflow": [
    (r"^test_reduces_lr_with_model_fit$", "asserts that the learning rate 0.1 * 0.1 equals 0.01 exactly, true in "
     "float32; DualOpt holds a float learning rate in float64 (0.010000000000000002), as documented"),
]}
#: Every paradigm runs Keras's generic optimizer tests; the sparse, loss-scale and callback tests, which
#: exercise Keras's machinery around the optimizer more than the rule, run once, with finetune (anchors,
#: the most state), to keep the run short (DualOpt's eager applies are many small ops).
_EVERY_PARADIGM = FILES[:1]


def _with_paradigm(kwargs: dict[str, Any]) -> dict[str, Any]:
    for key, value in PULL_OFF[PARADIGM].items():
        kwargs.setdefault(key, value)
    return kwargs


@keras.saving.register_keras_serializable(package="dualopt_keras_suite")
class SGD(DualOpt):
    """DualOpt with ``direction="sgd"`` and Keras's SGD defaults."""

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 **kwargs: Any) -> None:
        kwargs.setdefault("direction", "sgd")
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, **_with_paradigm(kwargs))


@keras.saving.register_keras_serializable(package="dualopt_keras_suite")
class Adam(DualOpt):
    """DualOpt with ``direction="adam"`` and Keras's Adam defaults."""

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, amsgrad: bool = False, **kwargs: Any) -> None:
        if amsgrad:
            raise ValueError("DualOpt has no amsgrad")
        kwargs.setdefault("direction", "adam")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         **_with_paradigm(kwargs))


def install() -> None:
    """Make Keras's SGD and Adam names (attributes and the ``optimizers.get`` registry) resolve to DualOpt."""
    for module, name, cls in ((keras_optimizers, "SGD", SGD), (keras_sgd, "SGD", SGD),
                              (keras_optimizers, "Adam", Adam), (keras_adam, "Adam", Adam)):
        setattr(module, name, cls)
    keras_optimizers.ALL_OBJECTS_DICT["sgd"] = SGD
    keras_optimizers.ALL_OBJECTS_DICT["adam"] = Adam


class SkipPlugin:
    """Skips the tests of ``SKIPS``, each with its reason."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        for item in items:
            for part, reason in SKIPS + BACKEND_SKIPS.get(keras.backend.backend(), []):
                if re.search(part, item.name):
                    item.add_marker(pytest.mark.skip(reason=f"DualOpt: {reason}"))
                    break


def main(out_dir: str) -> int:
    """Keras's tests in every paradigm; pytest's worst exit code."""
    global PARADIGM
    os.chdir(out_dir)  # where Keras's tests write their files
    install()
    worst = 0
    for paradigm in PARADIGMS:
        PARADIGM = paradigm
        files = FILES if paradigm == "finetune" else _EVERY_PARADIGM
        if keras.backend.backend() == "tensorflow" and paradigm != "finetune":
            continue  # the jax run covers the paradigms; tensorflow adds IndexedSlices, tf.Variable, tf.distribute
        code = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", _KERAS,
                            f"--junitxml={os.path.join(out_dir, paradigm + '.xml')}", *files],
                           plugins=[SkipPlugin()])
        worst = max(worst, int(code))
    return worst


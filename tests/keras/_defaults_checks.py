"""Launched on one Keras backend by test_keras_defaults.py (``_launcher``); :func:`run` returns the findings."""

from __future__ import annotations

import warnings

import keras
import numpy as np

from decoupled_core import HyperparameterError, WeightDecayWarning
from dualopt.keras import DualOpt


def run() -> dict:
    """What the tests of ``test_keras_defaults.py`` assert on."""
    out: dict = {}
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), keras.layers.Dense(3)])
    opt = DualOpt(learning_rate=1e-3, paradigm="finetune", rollback_max=10.0)
    try:
        opt.layer_rates()
    except ValueError as e:
        out["unbuilt"] = str(e)
    opt.build(model.trainable_variables)
    out["table"] = list(opt.layer_rates().values())
    out["paths"] = list(opt.layer_rates())

    warmup = keras.optimizers.schedules.CosineDecay(0.0, 100, warmup_target=2e-3, warmup_steps=10)
    out["warmup_kappa"] = DualOpt(learning_rate=warmup, paradigm="finetune").rollback_max
    out["explicit_kappa"] = DualOpt(learning_rate=lambda: 0.0, paradigm="finetune", base_learning_rate=4e-3).rollback_max
    try:
        DualOpt(learning_rate=lambda: 0.0, paradigm="finetune").build(model.trainable_variables)
    except HyperparameterError as e:
        out["no_peak"] = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DualOpt(learning_rate=1e-3, paradigm="finetune", weight_decay=0.0)
        DualOpt(learning_rate=1e-3, paradigm={"dense": "finetune"}, default_paradigm="scratch", weight_decay=0.0)
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, WeightDecayWarning)]
    cfg = DualOpt(learning_rate=warmup, paradigm="finetune", base_learning_rate=2e-3).get_config()
    out["config_base"] = cfg["base_learning_rate"]
    return out

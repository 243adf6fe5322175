"""Every invalid hyperparameter is rejected with "<public name>=<value> is invalid: expected <accepted>."."""

from __future__ import annotations

import math

import numpy as np
import pytest

import decoupled_core as dc
from decoupled_core import HyperparameterError, HyperParams

NAN, INF = math.nan, math.inf

# Public spellings of three ecosystems (see spec/SPEC.md section 2); every case runs under each.
NAMES = {
    "canonical": {},
    "torch": {"beta1": "betas[0]", "beta2": "betas[1]"},
    "optax": {"lr": "learning_rate", "beta1": "b1", "beta2": "b2"},
    "keras": {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"},
}

A01 = "a finite number in [0, 1)"
NONNEG = "a finite float >= 0"

# (id, HyperParams changes, lr, nonfinite, canonical name in the message, bad value, accepted text with
#  "{lr}"/"{weight_decay}"/"{rollback_max}" standing for public names)
INVALID = [
    ("lr-negative", {}, -1e-3, "skip", "lr", -1e-3, NONNEG),
    ("lr-nan", {}, NAN, "skip", "lr", NAN, NONNEG),
    ("lr-inf", {}, INF, "skip", "lr", INF, NONNEG),
    ("lr-bool", {}, True, "skip", "lr", True, NONNEG),
    ("direction", {"direction": "adamw"}, 1e-3, "skip", "direction", "adamw", "one of ('adam', 'sgd')"),
    ("paradigm", {"paradigm": "transfer"}, 1e-3, "skip", "paradigm", "transfer",
     "one of ('scratch', 'finetune', 'none')"),
    ("nonfinite", {}, 1e-3, "raise", "nonfinite", "raise", "one of ('skip', 'propagate')"),
    ("beta1-one", {"beta1": 1.0}, 1e-3, "skip", "beta1", 1.0, A01),
    ("beta1-negative", {"beta1": -0.1}, 1e-3, "skip", "beta1", -0.1, A01),
    ("beta1-nan", {"beta1": NAN}, 1e-3, "skip", "beta1", NAN, A01),
    ("beta2-one", {"beta2": 1.0}, 1e-3, "skip", "beta2", 1.0, A01),
    ("beta2-above", {"beta2": 1.5}, 1e-3, "skip", "beta2", 1.5, A01),
    ("beta2-negative", {"beta2": -1e-9}, 1e-3, "skip", "beta2", -1e-9, A01),
    ("beta2-string", {"beta2": "0.999"}, 1e-3, "skip", "beta2", "0.999", A01),
    ("eps-negative", {"eps": -1e-8}, 1e-3, "skip", "eps", -1e-8, NONNEG),
    ("eps-inf", {"eps": INF}, 1e-3, "skip", "eps", INF, NONNEG),
    ("momentum-one", {"momentum": 1.0}, 1e-3, "skip", "momentum", 1.0, A01),
    ("momentum-negative", {"momentum": -0.5}, 1e-3, "skip", "momentum", -0.5, A01),
    ("nesterov-not-bool", {"nesterov": 1}, 1e-3, "skip", "nesterov", 1, "True or False"),
    ("nesterov-momentum-zero", {"direction": "sgd", "nesterov": True, "momentum": 0.0}, 1e-3, "skip",
     "momentum", 0.0, "a momentum > 0 when nesterov=True"),
    ("weight_decay-negative", {"weight_decay": -0.01}, 1e-3, "skip", "weight_decay", -0.01, NONNEG),
    ("weight_decay-nan", {"weight_decay": NAN}, 1e-3, "skip", "weight_decay", NAN, NONNEG),
    ("rollback_max-negative", {"paradigm": "finetune", "rollback_max": -1.0}, 1e-3, "skip", "rollback_max", -1.0,
     "a finite float >= 0, or None"),
    ("rollback_max-inf", {"paradigm": "finetune", "rollback_max": INF}, 1e-3, "skip", "rollback_max", INF,
     "a finite float >= 0, or None"),
    ("rollback_min-negative", {"paradigm": "finetune", "rollback_min": -0.1}, 1e-3, "skip", "rollback_min", -0.1,
     NONNEG),
    ("rollback_min-nan", {"rollback_min": NAN}, 1e-3, "skip", "rollback_min", NAN, NONNEG),
    ("rollback_power-zero", {"paradigm": "finetune", "rollback_power": 0.0}, 1e-3, "skip", "rollback_power", 0.0,
     "a finite float > 0"),
    ("rollback_power-negative", {"rollback_power": -1.0}, 1e-3, "skip", "rollback_power", -1.0,
     "a finite float > 0"),
    ("rollback_power-inf", {"rollback_power": INF}, 1e-3, "skip", "rollback_power", INF, "a finite float > 0"),
    ("rollback_min-above-max", {"paradigm": "finetune", "rollback_max": 2.0, "rollback_min": 3.0}, 1e-3, "skip",
     "rollback_min", 3.0, "a value <= {rollback_max}=2.0"),
    ("rollback_min-above-default-max", {"paradigm": "finetune", "rollback_min": 20.0}, 1e-3, "skip",
     "rollback_min", 20.0, "a value <= {rollback_max}=10.0"),
    ("lr-times-weight_decay", {"paradigm": "scratch", "weight_decay": 3.0}, 0.5, "skip", "weight_decay", 3.0,
     "{lr} * {weight_decay} <= 1 (the pull coefficient must lie in [0, 1]; {lr}=0.5 gives 1.5)"),
    ("lr-times-rollback_max", {"paradigm": "finetune", "rollback_max": 30.0}, 0.05, "skip", "rollback_max", 30.0,
     "{lr} * {rollback_max} <= 1 (the pull coefficient must lie in [0, 1]; {lr}=0.05 gives 1.5"),
    ("rollback_max-default-with-lr-zero", {"paradigm": "finetune"}, 0.0, "skip", "rollback_max", None,
     "(the default None means 0.01/{lr} and needs a positive base {lr}, got 0.0)"),
]


@pytest.mark.parametrize("ecosystem", NAMES)
@pytest.mark.parametrize(("changes", "lr", "nonfinite", "name", "value", "accepted"),
                         [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_hyperparameter_message(ecosystem, changes, lr, nonfinite, name, value, accepted):
    names = NAMES[ecosystem]
    public = {k: names.get(k, k) for k in ("lr", "weight_decay", "rollback_max")}
    hp = HyperParams(**changes)
    with pytest.raises(HyperparameterError) as info:
        dc.validate(hp, lr=lr, nonfinite=nonfinite, names=names)
    msg = str(info.value)
    assert msg.startswith(f"{names.get(name, name)}={value!r} is invalid: expected "), msg
    assert accepted.format(**public) in msg, msg
    assert msg.endswith(".")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("hp", "lr"), [
    (HyperParams(), 1e-3),
    (HyperParams(paradigm="finetune"), 1e-3),
    (HyperParams(paradigm="none", direction="sgd", nesterov=True), 0.1),
    (HyperParams(beta1=0.0, beta2=0.0, eps=0.0, momentum=0.0, weight_decay=0.0), 0.0),
    (HyperParams(paradigm="scratch", weight_decay=2.0), 0.5),                       # lr * lambda == 1: allowed
    (HyperParams(paradigm="finetune", rollback_max=20.0), 0.05),                    # lr * kappa == 1: allowed
    (HyperParams(paradigm="finetune", rollback_max=2.0, rollback_min=2.0), 1e-3),  # kappa_min == kappa_max
    (HyperParams(paradigm="finetune", rollback_max=3.0), 0.0),                      # explicit kappa, lr 0
    (HyperParams(paradigm="finetune", rollback_max=1e6), None),                     # schedule: clipped at run time
    (HyperParams(paradigm="scratch", weight_decay=1), 1),                           # ints are numbers
])
def test_valid_hyperparameters_pass(hp, lr):
    assert dc.validate(hp, lr=lr) is None


def test_default_rollback_max_is_resolved_from_base_lr():
    assert dc.resolve_rollback_max(None, 1e-3) == 0.01 / 1e-3
    assert dc.resolve_rollback_max(0.0, None) == 0.0
    with pytest.raises(HyperparameterError, match=r"^rollback_max=None is invalid: .*positive base learning_rate, got None\)\.$"):
        dc.resolve_rollback_max(None, None, names={"lr": "learning_rate"})


def test_reference_optimizer_validates_every_group():
    with pytest.raises(HyperparameterError, match=r"^beta1=1\.0 is invalid"):
        dc.ReferenceOptimizer([np.zeros(2), np.zeros(2)], [HyperParams(), HyperParams(beta1=1.0)], base_lr=1e-3)
    with pytest.raises(HyperparameterError, match=r"^nonfinite='ignore' is invalid"):
        dc.ReferenceOptimizer([np.zeros(2)], [HyperParams()], base_lr=1e-3, nonfinite="ignore")


@pytest.mark.parametrize("layer_index", [[0, -1], [0, 1.5], [0, "a"], [0], [0, 1, 2]],
                         ids=["negative", "non-int", "string", "too-short", "too-long"])
def test_reference_optimizer_rejects_bad_layer_index(layer_index):
    with pytest.raises(HyperparameterError) as info:
        dc.ReferenceOptimizer([np.zeros(2), np.zeros(3)], [HyperParams()] * 2, base_lr=1e-3,
                              layer_index=layer_index)
    msg = str(info.value)
    assert msg.startswith("layer_index=") and "is invalid: expected" in msg
    if len(layer_index) != 2:
        assert f"'<{len(layer_index)} entries>'" in msg and "(2)" in msg
    else:
        assert f"={layer_index[1]!r} is invalid: expected a non-negative integer layer key" in msg


def test_invalid_helper_formats_public_message():
    err = dc.invalid("anchor", "<shape (3,)>", "an anchor of shape (2,)")
    assert isinstance(err, HyperparameterError)
    assert str(err) == "anchor='<shape (3,)>' is invalid: expected an anchor of shape (2,)."

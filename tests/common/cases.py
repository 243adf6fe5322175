"""The bad-input table of the reliability suite, shared by the pytest side and the Keras worker.

Framework-free (numpy and decoupled_core only), so that ``tests/keras/_reliability_checks.py``
can import it in a Keras subprocess and the pytest process can compute the
core's message for the same case.

Every case is written once under the spec's canonical names; each adapter's
public spelling comes from :data:`PUBLIC_NAMES` (spec section 2). The expected
text of a hyperparameter case is what :func:`decoupled_core.validate` says with
the adapter's names; of a layer-key case what
:func:`decoupled_core.number_layers` says; of an anchor case what
:func:`decoupled_core.check_anchor` says, each extended by
:data:`ALSO_ACCEPTED` where the adapter accepts more. A state case has no core
message (the formats are the frameworks'): only the shared form and the
argument it names (:data:`STATE_ARGUMENT`) are prescribed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import decoupled_core as dc

ADAPTERS = ("torch", "optax", "keras")

#: canonical name -> public name, per adapter (what the adapters pass to ``validate(names=...)``).
PUBLIC_NAMES: dict[str, dict[str, str]] = {
    "torch": {"beta1": "betas[0]", "beta2": "betas[1]"},
    "optax": {"lr": "learning_rate", "beta1": "b1", "beta2": "b2"},
    "keras": {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"},
}

#: What each adapter accepts besides the core's range, per canonical name (the core appends it:
#: ``decoupled_core.accepted``). Written out here, not read from the adapters, so a change is a test failure.
ALSO_ACCEPTED: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {},
    "optax": {"lr": ("an optax schedule",)},
    "keras": {"lr": ("a LearningRateSchedule",),
              "paradigm": ("a mapping from layer name / variable path to one of them", "a callable taking the variable")},
}

NAN, INF = math.nan, math.inf
#: The two parameter tensors every validation case is built on (float32, shapes (2,) and (3,)).
PARAM_SHAPES = ((2,), (3,))


@dataclass(frozen=True)
class BadInput:
    """One bad input, in canonical terms.

    ``kind`` is ``"hyper"`` (hyperparameters: ``changes`` are HyperParams
    fields, plus ``lr`` and ``nonfinite``), ``"layer_index"`` (``keys`` is the
    per-tensor list, or a list of the wrong length), ``"anchor"`` (an
    explicit anchor for the first tensor: ``anchor_shape``, ``anchor_dtype``)
    or ``"state"`` (a saved state loaded into a default DualOpt on
    :data:`PARAM_SHAPES`: ``saved`` describes where it comes from).
    """

    id: str
    kind: str = "hyper"
    changes: dict = field(default_factory=dict)
    lr: Any = 1e-3
    nonfinite: str = "skip"
    keys: Any = None
    anchor_shape: tuple = (2,)
    anchor_dtype: str = "float32"
    saved: dict = field(default_factory=dict)

    @property
    def hp(self) -> dc.HyperParams:
        return dc.HyperParams(**self.changes)


def _h(id: str, lr: Any = 1e-3, nonfinite: str = "skip", **changes: Any) -> BadInput:
    return BadInput(id, "hyper", changes, lr, nonfinite)


FT = "finetune"

CASES: list[BadInput] = [
    # learning rate
    _h("lr-negative", lr=-1e-3), _h("lr-nan", lr=NAN), _h("lr-inf", lr=INF), _h("lr-neg-inf", lr=-INF),
    _h("lr-bool", lr=True), _h("lr-string", lr="1e-3"),
    # unknown strings
    _h("direction-unknown", direction="adamw"), _h("direction-case", direction="Adam"),
    _h("paradigm-unknown", paradigm="transfer"), _h("paradigm-empty", paradigm=""),
    _h("nonfinite-unknown", nonfinite="raise"),
    # betas outside [0, 1)
    _h("beta1-one", beta1=1.0), _h("beta1-negative", beta1=-0.1), _h("beta1-nan", beta1=NAN),
    _h("beta1-bool", beta1=True), _h("beta1-numpy-one", beta1=np.float64(1.0)),
    _h("beta2-one", beta2=1.0), _h("beta2-above", beta2=1.5), _h("beta2-negative", beta2=-1e-9),
    _h("beta2-inf", beta2=INF), _h("beta2-string", beta2="0.999"),
    # eps
    _h("eps-negative", eps=-1e-8), _h("eps-inf", eps=INF), _h("eps-nan", eps=NAN), _h("eps-none", eps=None),
    # sgd direction
    _h("momentum-one", direction="sgd", momentum=1.0), _h("momentum-negative", direction="sgd", momentum=-0.5),
    _h("momentum-nan", direction="sgd", momentum=NAN),
    _h("nesterov-not-bool", direction="sgd", nesterov=1),
    _h("nesterov-momentum-zero", direction="sgd", nesterov=True, momentum=0.0),
    # weight decay (scratch pull rate)
    _h("weight_decay-negative", weight_decay=-0.01), _h("weight_decay-nan", weight_decay=NAN),
    _h("weight_decay-inf", weight_decay=INF), _h("weight_decay-bool", weight_decay=True),
    # rollback schedule
    _h("rollback_max-negative", paradigm=FT, rollback_max=-1.0), _h("rollback_max-inf", paradigm=FT, rollback_max=INF),
    _h("rollback_max-nan", paradigm=FT, rollback_max=NAN),
    _h("rollback_min-negative", paradigm=FT, rollback_min=-0.1), _h("rollback_min-nan", paradigm=FT, rollback_min=NAN),
    _h("rollback_power-zero", paradigm=FT, rollback_power=0.0),
    _h("rollback_power-negative", paradigm=FT, rollback_power=-1.0),
    _h("rollback_power-inf", paradigm=FT, rollback_power=INF), _h("rollback_power-bool", paradigm=FT, rollback_power=True),
    _h("rollback_min-above-max", paradigm=FT, rollback_max=2.0, rollback_min=3.0),
    _h("rollback_min-above-default-max", paradigm=FT, rollback_min=20.0),
    _h("rollback_max-default-with-lr-zero", lr=0.0, paradigm=FT),
    # the pull coefficient lr * rho must lie in [0, 1] where lr is known
    _h("pull-lr-times-weight_decay", lr=0.5, paradigm="scratch", weight_decay=3.0),
    _h("pull-lr-times-rollback_max", lr=0.05, paradigm=FT, rollback_max=30.0),
    # layer keys (two tensors)
    BadInput("layer_index-negative", "layer_index", keys=[0, -1]),
    BadInput("layer_index-float", "layer_index", keys=[0, 1.5]),
    BadInput("layer_index-string", "layer_index", keys=[0, "a"]),
    BadInput("layer_index-bool", "layer_index", keys=[0, True]),
    BadInput("layer_index-too-long", "layer_index", keys=[0, 1, 2]),
    BadInput("layer_index-too-short", "layer_index", keys=[0]),
    # explicit finetune anchors (for the first tensor; float32 params)
    BadInput("anchor-shape", "anchor", anchor_shape=(3,)),
    BadInput("anchor-shape-transposed", "anchor", anchor_shape=(2, 1)),
    BadInput("anchor-dtype-float64", "anchor", anchor_dtype="float64"),
    BadInput("anchor-dtype-float16", "anchor", anchor_dtype="float16"),
    BadInput("anchor-dtype-int32", "anchor", anchor_dtype="int32"),
    BadInput("anchor-shape-scalar", "anchor", anchor_shape=()),
    # more bad values of the same arguments (types the frameworks would otherwise coerce)
    _h("lr-numpy-negative", lr=np.float64(-1e-3)), _h("lr-array-nan", lr=np.array(NAN)),
    _h("direction-none", direction=None), _h("beta1-string", beta1="0.9"),
    _h("rollback_min-inf", paradigm=FT, rollback_min=INF), _h("rollback_power-nan", paradigm=FT, rollback_power=NAN),
    _h("weight_decay-string", weight_decay="0.01"),
    BadInput("layer_index-nested", "layer_index", keys=[[0], [1]]),
    # a saved state that does not belong to this optimizer (loaded into DualOpt() on PARAM_SHAPES, adam, scratch)
    BadInput("state-other-optimizer", "state", saved={"native": True}),
    BadInput("state-other-model", "state", saved={"shapes": ((3,), (3,))}),
    BadInput("state-other-paradigm", "state", saved={"paradigm": "finetune"}),
    BadInput("state-other-direction", "state", saved={"direction": "sgd"}),
]

#: The argument a state error names, per adapter (the text after it is the adapter's: the core has no state format).
STATE_ARGUMENT = {"torch": "state_dict", "optax": "state", "keras": "optimizer state"}

CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)


def core_message(case: BadInput, adapter: str) -> str:
    """The core's message for ``case`` under ``adapter``'s public names (the test's expectation)."""
    names = PUBLIC_NAMES[adapter]
    if case.kind == "state":
        raise AssertionError(f"{case.id}: the core has no message for a state (see STATE_ARGUMENT)")
    try:
        if case.kind == "hyper":
            dc.validate(case.hp, lr=case.lr, nonfinite=case.nonfinite, names=names,
                        also_accepted=ALSO_ACCEPTED[adapter])
        elif case.kind == "layer_index":
            dc.number_layers(["scratch"] * len(PARAM_SHAPES), case.keys, name="layer_index")
        else:
            dc.check_anchor("anchor", case.anchor_shape, case.anchor_dtype, PARAM_SHAPES[0], "float32")
    except dc.HyperparameterError as e:
        return str(e)
    raise AssertionError(f"the core accepts {case.id}: not a bad input")


def split_message(msg: str) -> tuple[str, str]:
    """``"name=value is invalid: ..."`` -> ``("name", "value is invalid: ...")``.

    The public name may index into the argument (``anchor['0.weight']``,
    ``layer_index[1]``); everything after the first ``=`` that follows the
    name's brackets must match the core word for word.
    """
    depth, quote = 0, None
    for i, ch in enumerate(msg):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch if depth else None
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "=" and depth == 0:
            return msg[:i], msg[i + 1:]
    return msg, ""


def public_argument(case: BadInput, adapter: str) -> str:
    """The argument the message must name (before any index into it)."""
    if case.kind == "state":
        return STATE_ARGUMENT[adapter]
    if case.kind != "hyper":
        return case.kind
    msg = core_message(case, adapter)
    return split_message(msg)[0]


def anchor_array(case: BadInput) -> np.ndarray:
    """The explicit anchor of an anchor case, as numpy (converted by each adapter's worker)."""
    return np.zeros(case.anchor_shape, dtype=case.anchor_dtype)


def saved_setup(case: BadInput) -> tuple[tuple, dict[str, Any]] | None:
    """(param shapes, canonical changes) of the optimizer a state case saves from; None for a native Adam."""
    if case.saved.get("native"):
        return None
    changes = {k: v for k, v in case.saved.items() if k != "shapes"}
    return tuple(case.saved.get("shapes", PARAM_SHAPES)), changes


def adapter_kwargs(case: BadInput, adapter: str) -> dict[str, Any]:
    """Constructor keyword arguments that express ``case`` in ``adapter``'s public spelling.

    The learning rate is under ``"lr"`` (torch) or ``"learning_rate"``; an
    anchor is a list aligned with the two parameters, holding a numpy array
    that the caller converts to its framework.
    """
    kw: dict[str, Any] = {}
    changes = dict(case.changes)
    lr_name = "lr" if adapter == "torch" else "learning_rate"
    kw[lr_name] = case.lr
    kw["nonfinite"] = case.nonfinite
    b1, b2 = changes.pop("beta1", None), changes.pop("beta2", None)
    if adapter == "torch":
        if b1 is not None or b2 is not None:
            kw["betas"] = (0.9 if b1 is None else b1, 0.999 if b2 is None else b2)
        if "eps" in changes:
            kw["eps"] = changes.pop("eps")
    else:
        names = PUBLIC_NAMES[adapter]
        if b1 is not None:
            kw[names["beta1"]] = b1
        if b2 is not None:
            kw[names["beta2"]] = b2
        if "eps" in changes:
            kw[names.get("eps", "eps")] = changes.pop("eps")
    kw.update(changes)
    if case.kind == "layer_index":
        kw["layer_index"] = list(case.keys)
    elif case.kind == "anchor":
        kw["paradigm"] = "finetune"
        kw["anchor"] = [anchor_array(case), None]
    return kw

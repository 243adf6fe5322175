"""decoupled_core: the DualOpt rule, written once against the Python Array API standard.

No framework is imported here. Adapters (``dualopt.torch``, ``dualopt.optax``,
``dualopt.keras``) translate their conventions and call these functions; the
normative description is ``spec/SPEC.md``.

Where each formula lives:

- hyperparameters, defaults, validation: :mod:`decoupled_core.hyperparams`
- layer numbering and rho_l (scratch / finetune schedules): :mod:`decoupled_core.layers`
- per-step scalars (bias corrections, pull coefficient): :mod:`decoupled_core.coefficients`
- direction, pre-weight, pull, one tensor's step: :mod:`decoupled_core.rule`
- a whole reference optimizer over a list of arrays: :mod:`decoupled_core.reference`
"""

from .coefficients import AdamCoefficients, adam_coefficients, bias_correction, pull_coefficient
from .hyperparams import (
    DEFAULT_ROLLBACK_FRACTION,
    DIRECTIONS,
    NONFINITE_POLICIES,
    PARADIGMS,
    HyperparameterError,
    HyperParams,
    ACCEPTED,
    accepted,
    check_anchor,
    dtype_name,
    invalid,
    resolve_rollback_max,
    validate,
    WeightDecayWarning,
    warn_finetune_weight_decay,
)
from .layers import LayerOrderWarning, canonical_order, natural_sort_key, role_rank, check_layer_count, check_layer_key, finetune_rate, layer_rates, number_layers, pull_rate, scratch_rate
from .reference import ReferenceOptimizer
from .rule import (
    AdamState,
    SGDState,
    adam_pre_weight,
    all_finite,
    init_anchor,
    init_direction_state,
    pull,
    sgd_pre_weight,
    step_tensor,
)
from ._xp import compute_dtype

__version__ = "0.1.0"

__all__ = [
    "AdamCoefficients", "adam_coefficients", "bias_correction", "pull_coefficient",
    "DEFAULT_ROLLBACK_FRACTION", "DIRECTIONS", "NONFINITE_POLICIES", "PARADIGMS",
    "HyperparameterError", "HyperParams", "ACCEPTED", "accepted", "check_anchor", "dtype_name", "invalid", "resolve_rollback_max", "validate", "WeightDecayWarning", "warn_finetune_weight_decay",
    "LayerOrderWarning", "canonical_order", "natural_sort_key", "role_rank", "check_layer_count", "check_layer_key", "finetune_rate", "layer_rates", "number_layers", "pull_rate", "scratch_rate",
    "ReferenceOptimizer",
    "AdamState", "SGDState", "adam_pre_weight", "all_finite", "init_anchor", "init_direction_state",
    "pull", "sgd_pre_weight", "step_tensor", "compute_dtype",
]

"""bfloat16 and float16 variables with ``dualopt.keras.DualOpt`` (SPEC 6: float32 compute and slots).

The problem of ``tests/common/lowprec_data.py`` as a Keras model whose Dense layers use the
``bfloat16`` / ``float16`` dtype policy (variables, activations and gradients
in that dtype; the loss in float32), trained with ``fit`` in a subprocess per
backend (``_lowprec_fuzz_checks.py``; jax in the default run,
tensorflow and torch slow). DualOpt (scratch; finetune backbone + scratch
head) must stay finite, keep every float slot (moments, anchors) float32,
decrease the loss and end within ``LOSS_TOLERANCE`` of its float32 run, and
within ``VS_ADAMW`` of ``keras.optimizers.AdamW`` in the same dtype where
AdamW trains (Keras's AdamW adds its epsilon before the bias correction, a
slightly different method; the comparison is about precision, not method).
"""

from __future__ import annotations

import pytest

from tests.common import lowprec_data as lp
from tests.keras._lowprec_fuzz import keras_backends, keras_result


@pytest.mark.keras_backend
@pytest.mark.parametrize("backend", keras_backends())
@pytest.mark.parametrize("kind", ["scratch", "finetune"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_trains_like_float32(dtype, kind, backend):
    runs = keras_result(backend, "lowprec")
    ref, got, adamw = runs[f"{kind}/float32"], runs[f"{kind}/{dtype}"], runs[f"adamw/{dtype}"]
    print(f"\n[lowprec keras[{backend}] {dtype} {kind}] final loss {got['final']:.4f} (float32 {ref['final']:.4f}, "
          f"AdamW {dtype} {adamw['final']:.4f}, initial {got['first']:.4f})")
    assert got["param_dtypes"] == [dtype]
    assert got["slot_dtypes"] == ["float32"], got["slot_dtypes"]
    assert adamw["slot_dtypes"] != ["float32"] or dtype == "float32"  # the comparison is not vacuous: AdamW's are low
    if kind == "finetune":
        assert got["n_anchors"] == 4  # the backbone's kernels and biases
    assert got["losses_finite"] and got["weights_finite"]
    assert got["final"] < (0.5 if kind == "scratch" else 0.8) * got["first"]
    assert abs(got["final"] - ref["final"]) <= lp.LOSS_TOLERANCE[dtype], (got["final"], ref["final"])
    if kind == "scratch" and adamw["losses_finite"] and adamw["weights_finite"]:
        assert got["final"] <= adamw["final"] + lp.VS_ADAMW, (got["final"], adamw["final"])

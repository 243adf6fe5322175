"""Which paradigm and layer key each Keras variable gets (pure Python: no Keras backend needed)."""

from __future__ import annotations

from types import SimpleNamespace as V

import pytest

from decoupled_core import HyperparameterError
from dualopt.keras._layout import (check_layer_index_spec, check_paradigm_spec, matching_key, resolve_layer_keys,
                                   resolve_paradigms)

SEQ = [V(path=p) for p in ("sequential/backbone/conv/kernel", "sequential/backbone/conv/bias",
                           "sequential/head/kernel", "sequential/head/bias")]


def test_matching_is_by_whole_path_segments_and_longest_key_wins():
    assert matching_key(["head"], "sequential/head/kernel") == "head"
    assert matching_key(["sequential/head"], "sequential/head/kernel") == "sequential/head"
    assert matching_key(["head/kernel"], "sequential/head/kernel") == "head/kernel"
    assert matching_key(["hea", "ead", "head/bias"], "sequential/head/kernel") is None
    assert matching_key(["head", "head/kernel"], "sequential/head/kernel") == "head/kernel"
    assert matching_key(["head/kernel", "head"], "sequential/head/kernel") == "head/kernel"
    # Equal length: the first listed wins.
    assert matching_key(["backbone", "conv/bias"], "m/backbone/conv/bias") == "conv/bias"
    assert matching_key(["conv/bias", "backbone"], "m/backbone/conv/bias") == "conv/bias"


def test_backbone_finetune_head_scratch_in_one_mapping():
    assert resolve_paradigms({"head": "scratch"}, "finetune", SEQ) == ["finetune", "finetune", "scratch", "scratch"]
    assert resolve_paradigms("none", "scratch", SEQ) == ["none"] * 4
    assert resolve_paradigms({"bias": "none", "head": "scratch"}, "finetune", SEQ) == [
        "finetune", "none", "scratch", "none"]  # head/bias: "bias" and "head" tie in length; first listed wins


def test_callable_paradigm_none_means_default():
    f = lambda v: "scratch" if v.path.endswith("bias") else None  # noqa: E731
    assert resolve_paradigms(f, "finetune", SEQ) == ["finetune", "scratch", "finetune", "scratch"]
    with pytest.raises(HyperparameterError, match=r"paradigm\('sequential/backbone/conv/kernel'\)='x' is invalid"):
        resolve_paradigms(lambda v: "x", "finetune", SEQ)


def test_paradigm_spec_errors_name_the_argument():
    with pytest.raises(HyperparameterError, match=r"paradigm\['head'\]='scrach' is invalid: expected one of"):
        check_paradigm_spec({"head": "scrach"}, "finetune")
    with pytest.raises(HyperparameterError, match="default_paradigm='pretrained' is invalid"):
        check_paradigm_spec("scratch", "pretrained")
    with pytest.raises(HyperparameterError, match="paradigm=3 is invalid"):
        check_paradigm_spec(3, "scratch")
    assert set(check_paradigm_spec(lambda v: None, "none")) == {"scratch", "finetune", "none"}


def test_layer_keys():
    assert resolve_layer_keys(None, SEQ) is None
    assert resolve_layer_keys("layer", SEQ) == [0, 0, 1, 1]
    assert resolve_layer_keys([3, 3, 7, 7], SEQ) == [3, 3, 7, 7]
    assert resolve_layer_keys({"backbone": 0, "head": 5}, SEQ) == [0, 0, 5, 5]
    assert resolve_layer_keys(lambda v: len(v.path), SEQ) == [len(v.path) for v in SEQ]


def test_layer_key_errors():
    with pytest.raises(HyperparameterError, match="none matches 'sequential/head/kernel'"):
        resolve_layer_keys({"backbone": 0}, SEQ)
    with pytest.raises(HyperparameterError, match=r"layer_index='<2 entries>' is invalid: expected one layer index per parameter tensor \(4\)"):
        resolve_layer_keys([0, 1], SEQ)
    with pytest.raises(HyperparameterError, match=r"layer_index\[1\]=-1 is invalid"):
        check_layer_index_spec([0, -1])
    with pytest.raises(HyperparameterError, match="layer_index='block' is invalid"):
        check_layer_index_spec("block")
    with pytest.raises(HyperparameterError, match=r"layer_index\('sequential/backbone/conv/kernel'\)=True"):
        resolve_layer_keys(lambda v: True, SEQ)


def test_a_mapping_key_matching_no_variable_is_refused_with_close_matches():
    # Issue 19 R12: {"haed": "scratch"} was ignored, so the head got default_paradigm.
    with pytest.raises(HyperparameterError, match=r"paradigm key 'haed' matches no variable: did you mean 'head'\? "
                                                  r".*'sequential/head/kernel'"):
        resolve_paradigms({"haed": "scratch"}, "finetune", SEQ)
    with pytest.raises(HyperparameterError, match=r"paradigm key 'xyz' matches no variable: Keys match"):
        resolve_paradigms({"head": "scratch", "xyz": "none"}, "finetune", SEQ)
    with pytest.raises(HyperparameterError, match=r"layer_index key 'conv/kernal' matches no variable: did you mean "
                                                  r"'conv/kernel'"):
        resolve_layer_keys({"backbone": 0, "head": 1, "conv/kernal": 2}, SEQ)
    # Keys that match are fine, however many variables each matches.
    assert resolve_layer_keys({"backbone": 0, "head": 1}, SEQ) == [0, 0, 1, 1]


_NEGATIVE_STEP = r"""
import os, sys, zipfile, h5py, numpy as np
os.environ["KERAS_BACKEND"] = "jax"
import keras
import dualopt.keras
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile(optimizer=dualopt.keras.DualOpt(1e-2, default_paradigm="finetune"), loss="mse")
x, y = np.ones((4, 3)), np.zeros((4, 2))
model.fit(x, y, epochs=1, verbose=0)
model.save("ok.keras")
with zipfile.ZipFile("ok.keras") as src, zipfile.ZipFile("bad.keras", "w") as dst:
    for item in src.infolist():
        data = src.read(item.filename)
        if item.filename == "model.weights.h5":
            with open("w.h5", "wb") as f:
                f.write(data)
            with h5py.File("w.h5", "r+") as f:
                group = f["optimizer/vars"]
                for k in group:
                    if group[k].shape == () and group[k][()] == 1:  # iterations and DualOpt's step
                        group[k][()] = -5
            data = open("w.h5", "rb").read()
        dst.writestr(item, data)
keras.models.load_model("ok.keras")  # the untouched file loads
try:
    keras.models.load_model("bad.keras")
except ValueError as exc:  # Keras wraps the optimizer's HyperparameterError in its own ValueError
    print("REFUSED", exc)
    sys.exit(0)
print("LOADED")
sys.exit(1)
"""


def test_a_negative_count_in_a_keras_file_is_refused(tmp_path):
    """Issue 19 R7: a .keras file whose step count was made negative loaded, and the next step gave NaN/Inf."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _NEGATIVE_STEP], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "is invalid: expected a non-negative count" in proc.stdout

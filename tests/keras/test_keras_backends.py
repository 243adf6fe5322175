"""dualopt.keras on jax, torch and tensorflow: one subprocess per backend runs ``_backend_checks.py`` (``_launcher``).

Importing Keras with a backend takes 5-7 s and a process can hold only one
backend, so every check that needs a backend runs in one subprocess per
backend (cached per pytest worker); the tests below assert on its JSON.
Each backend is its own xdist group, so ``pytest -n 2 --dist loadgroup`` runs
two backends at once.

Tolerances (float64 unless stated; "eps" is the dtype's machine epsilon and
errors are ``max|got - expected| / max|expected|`` per tensor):

- ``FIT_EPS = 64``: a compiled train step computes ``beta ** t`` and the bias
  corrections from traced tensors (last bit may differ from the host), jax's
  XLA fuses element-wise chains, and torch's CPU sqrt is not correctly rounded
  (<= 1 ulp); over at most 24 steps these stay far below 64 eps. tensorflow and
  torch are usually bit-identical, which the JSON records.
- float32 vectors, ``F32_EPS = 64`` (float32 eps): the Keras graph computes the
  step scalars in float32 (documented in ``dualopt.keras``), where the core
  rounds float64 host scalars once.
- mixed_float16 fits (float32 weights): 16 float32 eps per step, the
  ``traced-scalars`` budget of spec/TOLERANCES.md, for the same reason.
"""

from __future__ import annotations

import functools

import pytest

from tests.keras._launcher import run_checks

BACKENDS = ("jax", "torch", "tensorflow")
FIT_EPS = 64.0
F32_EPS = 64.0
F32_MACHINE_EPS = 2.0**-23

pytestmark = pytest.mark.keras_backend


@functools.lru_cache(maxsize=None)
def results(backend: str) -> dict:
    pytest.importorskip("keras")
    pytest.importorskip({"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend])
    env = {"JAX_ENABLE_X64": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    r = run_checks(backend, "tests.keras._backend_checks:run_all", env=env, timeout=900)
    assert "__crash__" not in r, f"keras[{backend}] checks crashed:\n{r.get('__crash__')}"
    return r


def check(backend: str, name: str) -> dict:
    r = results(backend)[name]
    assert not (isinstance(r, dict) and "error" in r), r.get("error") if isinstance(r, dict) else r
    return r


def by_backend(fn):
    """Parametrize over backends, one xdist group per backend (its subprocess runs once per worker)."""
    params = [pytest.param(b, marks=pytest.mark.xdist_group(f"keras-{b}")) for b in BACKENDS]
    return pytest.mark.parametrize("backend", params)(fn)


@by_backend
def test_vectors_through_apply(backend):
    r = check(backend, "vectors")
    ran = {k: v for k, v in r.items() if v != "unsupported"}
    assert sorted(k for k, v in r.items() if v == "unsupported") == [
        "missing_grads.float64", "mixed_directions.float64"]  # shared step count; one direction per optimizer
    assert sum(k.endswith("float64") for k in ran) == 19  # warmup_from_zero is the 19th case
    for key, v in ran.items():
        assert v["nan_pattern_ok"], key
        tol = FIT_EPS * 2.0**-52 if key.endswith("float64") else F32_EPS * F32_MACHINE_EPS
        assert v["max_err_over_scale"] <= tol, (key, v)


@by_backend
def test_fit_matches_reference_and_keeps_anchors(backend):
    r = check(backend, "fit_matches_reference")
    assert len(r["per_epoch"]) == 3
    for epoch in r["per_epoch"]:
        assert epoch["max_err_eps"] <= FIT_EPS, r
    assert r["step_count"] == r["iterations"] == r["expected_steps"] == 12
    # The TF trap: anchors are the pre-fit weights after three epochs, on every backend.
    assert r["anchor_paths"] == ["backbone_0/bias", "backbone_0/kernel", "backbone_1/bias", "backbone_1/kernel"]
    assert r["anchors_equal_prefit"] is True
    assert r["anchors_differ_from_current"] is True


@by_backend
def test_nonfinite_batch_is_skipped_in_compiled_step(backend):
    r = check(backend, "fit_nonfinite_skip_with_ema")
    assert r["skipped"] == r["expected_skipped"] == 2
    assert r["step_count"] == r["expected_step_count"] == 6
    assert r["iterations"] == r["expected_iterations"] == 8
    for epoch in r["per_epoch"]:
        assert epoch["max_err_eps"] <= FIT_EPS, r
    # EMA: fit ends on the average; a skipped step leaves the average alone.
    assert r["ema_differs_from_params"] > 1e6
    assert r["ema_weights"]["max_err_eps"] <= FIT_EPS, r


@by_backend
def test_save_load_continue_is_bitwise(backend):
    r = check(backend, "save_load_continue")
    assert r["loaded_optimizer"] == "DualOpt"
    assert r["weights"]["bitwise"], r["weights"]
    assert r["optimizer_state_equal"]
    # Fixed slot order (dualopt.keras "Slot layout").
    assert r["optimizer_name"] == r["saved_optimizer_name"]  # the name travels in the config
    prefix = r["optimizer_name"] + "/"
    assert all(n.startswith(prefix) for n in r["slot_names"]), r["slot_names"]
    names = [n.removeprefix(prefix) for n in r["slot_names"]]
    assert names[:5] == ["iteration", "learning_rate", "step", "skipped", "layout"]
    assert names[5:7] == ["backbone_0_kernel_m", "backbone_0_kernel_v"]
    assert names[-4:] == ["backbone_0_kernel_anchor", "backbone_0_bias_anchor", "backbone_1_kernel_anchor",
                          "backbone_1_bias_anchor"]


@by_backend
def test_learning_rate_schedule(backend):
    for key in ("piecewise", "exponential", "callback"):  # two schedules, and LearningRateScheduler setting a float
        r = check(backend, "learning_rate_schedules")[key]
        assert r["weights"]["max_err_eps"] <= FIT_EPS, (key, r)
        assert r["rollback_max"] == r["expected_rollback_max"]  # 0.01 / schedule(0) or / the initial float
        assert len(set(r["lrs"])) > 1  # the learning rate moved during the run


@by_backend
def test_clipnorm_and_global_clipnorm(backend):
    r = check(backend, "clipping")
    for key in ("clipnorm", "global_clipnorm"):
        assert r[key]["clipping_mattered"] > 1e6, r  # clipping changed the result ...
        assert r[key]["weights"]["max_err_eps"] <= FIT_EPS, r  # ... exactly as Keras's formula says


@by_backend
def test_gradient_accumulation(backend):
    r = check(backend, "gradient_accumulation")
    assert r["weights"]["max_err_eps"] <= FIT_EPS, r
    assert r["step_count"] == r["expected_step_count"] == 4
    assert r["iterations"] == r["expected_iterations"] == 8


@by_backend
def test_fit_gradients_are_exact_so_keras_float32_demotion_cannot_move_them(backend):
    r = check(backend, "gradients_exact")
    assert r["bitwise"] is True, r
    assert r["dtypes"] == ["float64"]


@by_backend
def test_conformance_model_computes_in_float64(backend):
    # Float64 round-off is ~1e-15 of the largest gradient element; float32 anywhere would give ~1e-7.
    r = check(backend, "conformance_model_float64")
    assert r["grad_rel_err"] <= 1e-13, r
    assert r["dtypes"] == ["float64"]
    if backend == "jax":
        assert r["jaxpr_has_f64"] and not r["jaxpr_has_f32"], r


@by_backend
def test_dualopt_keras_ops_keep_float64(backend):
    r = check(backend, "keras_xp_float64")
    for name, v in r.items():
        if name == "isfinite_all":
            assert v is True
            continue
        assert v["dtype"] == "float64", (name, v)
        # One rounding per op (torch's sqrt: <= 1 ulp); three ops for "operators".
        assert v["max_rel_err"] <= (4 if name == "operators" else 1) * 2.0**-52, (name, v)


@by_backend
def test_anchor_trap_in_every_compile_mode(backend):
    r = check(backend, "anchor_trap")
    assert set(r) == {"default", "no_jit", "eager"} | ({"xla"} if backend != "torch" else set())
    for key, v in r.items():
        assert v["built_before_fit"] is False, key  # fit builds it (while tracing on tensorflow)
        assert v["anchors_equal_prefit"] is True, (key, v)
        assert v["step_count"] == 12
        assert v["pull_mattered"] > 1e6, (key, v)  # an anchor reset every step would be far off ...
        assert v["weights"]["max_err_eps"] <= FIT_EPS, (key, v)  # ... the weights match the core's
    if backend != "torch":
        assert r["xla"]["jit_compile"] == "True"


@by_backend
def test_loss_scale_factor_and_mixed_precision(backend):
    r = check(backend, "loss_scaling")
    f64 = r["float64"]
    assert f64["scale_loss_of_1"] == 1024.0  # the loss really was scaled ...
    assert f64["bitwise_equal_unscaled"] is True  # ... and the gradients unscaled before the update
    assert f64["weights"]["max_err_eps"] <= FIT_EPS, f64
    # mixed_float16: traced float32 scalars, the traced-scalars budget of 16 float32 eps per step.
    for key, optimizer in (("mixed_loss_scale_factor", "DualOpt"), ("mixed_auto_loss_scale", "LossScaleOptimizer")):
        v = r[key]
        assert v["optimizer"] == optimizer, v
        assert v["dtypes"] == ["float32"]
        assert v["step_count"] == v["steps"] == 8
        assert v["max_err_eps32"] <= 16 * v["steps"], (key, v)
        assert v["anchors_equal_prefit"] is True, key
    assert r["mixed_unscaled"]["max_err_eps32"] > 1e4  # without scaling the float16 gradients underflow


@by_backend
def test_ema_with_overwrite_frequency(backend):
    r = check(backend, "ema")
    assert r["overwrites"] == 2
    assert r["ema_mattered"] > 1e6
    assert r["weights"]["max_err_eps"] <= FIT_EPS, r


@by_backend
def test_float64_model_in_float32_session_steps_with_float64_learning_rate(backend):
    r = check(backend, "float64_model_float32_floatx")
    assert r["model"]["lr_dtype"] == "float64" and r["model"]["variable_dtypes"] == ["float64"]
    assert r["model"]["weights"]["max_err_eps"] <= FIT_EPS, r["model"]
    assert r["control_float32_lr"]["weights"]["max_err_eps"] > 1e6  # a float32 eta would be caught
    # Float32 models: the same bits as with a float32 variable, same slot order and name.
    assert r["float32_model_lr_dtypes"] == ["float64", "float32"]
    assert r["float32_model_same_bits"] is True
    ours, control = r["float32_model_slots"]
    assert ours[1] == "learning_rate" and len(ours) == len(control) == 13


@by_backend
def test_update_step_steps_with_the_learning_rate_it_is_given(backend):
    r = check(backend, "update_step_uses_its_learning_rate")
    for lr in ("0.03", "0.1"):
        assert r[lr]["max_err_eps"] <= 4.0, r  # the core in numpy; torch's sqrt may differ by 1 ulp
        assert r[lr]["step_count"] == 0, r  # update_step is one variable's step; apply advances t


@by_backend
def test_config_round_trip(backend):
    r = check(backend, "config_round_trip")
    for key in ("mapping", "schedule", "callable"):
        assert r[key]["type"] == "DualOpt"
        assert r[key]["equal"], key
        assert r[key]["arguments_not_kept"] == [], key  # incl. loss_scale_factor, EMA and accumulation options
    assert r["mapping"]["rollback_max"] == pytest.approx(0.01 / 0.02)
    assert r["rollback_max_stored"] == pytest.approx(0.5)  # resolved at construction, not from the current lr


@by_backend
def test_error_messages(backend):
    r = check(backend, "errors")
    assert r["beta_1"] == "beta_1=1.0 is invalid: expected a finite number in [0, 1)."
    assert r["epsilon"] == "epsilon=-1.0 is invalid: expected a finite float >= 0."
    assert r["paradigm_value"] == "paradigm['head']='scrach' is invalid: expected one of ('scratch', 'finetune', 'none')."
    assert r["weight_decay_bound"].startswith("weight_decay=3.0 is invalid: expected learning_rate * weight_decay <= 1")
    for key in ("paradigm", "default_paradigm", "nonfinite", "layer_index", "learning_rate", "layer_index_length",
                "anchor_shape", "exclude_from_weight_decay"):
        assert r[key] is not None and " is invalid: expected " in r[key], (key, r[key])
    assert r["load_other_layout"] is not None and "'a'" in r["load_other_layout"]


@by_backend
def test_doctests_and_imports(backend):
    r = check(backend, "doctests")
    assert r["attempted"] > 0 and r["failed"] == 0
    imports = check(backend, "imports")
    assert imports["added_by_dualopt"] == []


def test_torch_fast_path_equals_generic_path():
    r = check("torch", "fast_path_equals_generic")
    assert len(r) > 100
    for key, v in r.items():
        assert v["nan_pattern_ok"], (key, v)
        fused = ":fused:" in key or (key.startswith("random:whole:") and ":adam:" in key)
        if fused:
            # torch's fused Adam: another evaluation order, float64 scalars; both paths are within the
            # conformance budget of Keras optimizers (traced-scalars, 16 eps x t) of the core, so of each other
            # within twice that. Measured: at most ~35 eps after 20 float32 steps.
            assert v["max_err_eps"] <= 2 * 16 * v["steps"], (key, v)
        else:
            assert v["bitwise"], (key, v)
    # The fused kernel did run (a bitwise match everywhere would mean it never took a tensor).
    assert not all(v["bitwise"] for k, v in r.items() if ":fused:" in k)


test_torch_fast_path_equals_generic_path = pytest.mark.xdist_group("keras-torch")(
    test_torch_fast_path_equals_generic_path)


@pytest.mark.xdist_group("keras-torch")
def test_torch_fast_path_takes_misshaped_gradients_as_the_generic_path_does():
    # torch's fused Adam kernel checks no sizes: a (3,) gradient of a (4, 3) variable was read past its end.
    r = check("torch", "fast_path_gradient_shapes")
    assert r["broadcast"]["fast"] == r["broadcast"]["generic"]  # broadcast like Keras's own update, bit for bit
    assert r["broadcast"]["fast"][0] == "applied"
    for case in ("mismatch", "fewer_elements"):
        assert r[case]["fast"] == r[case]["generic"] == ["raised", "RuntimeError"], r[case]


def tensorflow_only(fn):
    return pytest.mark.xdist_group("keras-tensorflow")(fn)


@tensorflow_only
def test_indexed_slices_step_like_their_dense_gradient_after_any_clipping():
    # Issue 19 K3: Embedding layers give tf.IndexedSlices; adam (float * IndexedSlices) crashed.
    r = check("tensorflow", "sparse_gradients")
    for key in ("adam", "adam.clipnorm", "adam.global_clipnorm", "adam.clipvalue", "sgd", "sgd.clipnorm",
                "sgd.global_clipnorm", "sgd.clipvalue"):
        assert r[key]["bitwise"] is True, (key, r[key])
        assert r[key]["moved"] > 0.01, (key, r[key])


@by_backend
def test_model_with_embedding_layer_fits(backend):
    r = check(backend, "sparse_gradients")["embedding_fit"]
    assert r == {"step_count": 4, "finite": True}, r


@by_backend
def test_lazily_built_model_anchors_its_initial_weights_in_every_compile_mode(backend):
    # Issue 19 K4: on tensorflow the anchors were created with shape (0,) and the first step failed.
    r = check(backend, "lazy_model_anchors")
    assert set(r) == {"default", "no_jit", "eager"} | ({"xla"} if backend != "torch" else set())
    for key, v in r.items():
        assert v["anchor_shapes"] == [[4, 3], [3]], (key, v)
        assert v["anchors_equal_initial"] is True, (key, v)
        assert v["step_count"] == 8, (key, v)
        assert v["weights"]["max_err_eps"] <= FIT_EPS, (key, v)


@tensorflow_only
def test_mirrored_strategy_skips_a_nonfinite_batch_on_one_replica():
    # Issue 19 K5: the ops.cond around the distributed update broke merge_call.
    r = check("tensorflow", "mirrored_strategy")
    assert r["replicas"] == 2
    assert r["skipped"] == r["expected_skipped"] == 2
    assert r["step_count"] == 6 and r["iterations"] == 8
    assert r["weights"]["max_err_eps"] <= FIT_EPS, r


@tensorflow_only
def test_tf_train_checkpoint_saves_and_restores_the_optimizer():
    # Issue 19 K2: replacing the learning-rate variable in Keras's tracked list made TF refuse the save.
    r = check("tensorflow", "tf_checkpoint")
    assert r["float"] == {"n_variables": 8, "restored_equal": True, "step_count": 3}, r
    assert r["schedule"] == {"n_variables": 7, "restored_equal": True, "step_count": 3}, r


@by_backend
def test_default_names_are_unique_like_keras_optimizers(backend):
    # Issue 19 K1: every DualOpt was "dualopt" (MultiOptimizer / TensorBoard saw one optimizer).
    r = check(backend, "optimizer_names")
    a, b = r["default_names"]
    assert a != b and a.startswith("dual_opt") and b.startswith("dual_opt"), r
    assert r["given"] == "backbone_opt"
    assert r["from_config"] == a


@by_backend
def test_compile_load_weights_fit_resumes_bitwise(backend):
    # Issue 19 R5: the optimizer state in the file was dropped (t restarted, anchors re-taken from it).
    r = check(backend, "load_weights_resume")
    assert r["built_after_load"] is False and r["warnings"] == [], r
    assert r["weights"]["bitwise"] is True, r["weights"]
    assert r["optimizer_state_equal"] is True
    assert r["step_count"] == 16
    msg = r["adam_state"]
    assert msg is not None and "<14 variables>" in msg and "load the weights before compile()" in msg, msg


@by_backend
def test_bad_mappings_schedules_and_duplicates_are_refused(backend):
    r = check(backend, "errors")
    # Issue 19 R12: a key matching no variable was ignored (the head got default_paradigm).
    assert r["paradigm_typo"].startswith("paradigm key 'haed' matches no variable: did you mean 'head'?"), r
    assert "'head/kernel'" in r["paradigm_typo"]
    assert r["layer_index_typo"].startswith("layer_index key 'bb' matches no variable"), r
    # Issue 19 R9: a schedule starting negative or NaN is gradient ascent or NaN weights.
    for key, shown in (("schedule_negative", "-0.0"), ("schedule_nan", "nan"), ("callable_lr_negative", "-0.5")):
        assert r[key] is not None and "whose value at step 0 is " + shown in r[key], (key, r[key])
        assert r[key].endswith("expected a schedule whose value at step 0 is a finite float >= 0."), r[key]
    # The same variable twice was stepped twice per call (Keras's Adam and SGD do so silently too).
    assert r["duplicate_build"] == ("var_list='<3 variables>' is invalid: expected each variable once; "
                                    "'a' is at positions 0 and 2."), r
    assert r["duplicate_apply"] is not None and "'a' is at positions 0 and 1" in r["duplicate_apply"], r
    assert r["duplicate_apply_left_variable"] is True

"""Optax's own optimizer tests (from the installed wheel) pass against ``dualopt.optax.dualopt``.

``_optax_suite.py`` runs, in a subprocess (eight host devices, x64 off as
optax's tests expect), the generic cases of optax's ``alias_test.py``,
``float64_test.py`` and ``sharding_test.py`` with DualOpt (adam and sgd
directions, paradigms none / scratch / finetune) where optax passes or looks up
an optimizer. Every skip carries its one-line reason and, where DualOpt refuses
the input by design (complex params, abstract params for finetune), the refusal
itself is checked. Not run: optax's L-BFGS tests and ``_state_utils_test.py``,
whose expected values are optax's own state classes (``ScaleByAdamState`` ...).

Measured here (2 shared cores, load ~5): about 35 s of CPU, 90 s wall.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
#: Cases that must pass for every direction and paradigm.
GENERIC = ("alias_test::test_optimizers_accept_extra_args",
           "alias_test::test_optimizers_can_be_wrapped_in_inject_hyperparams",
           "alias_test::test_preserve_dtype", "alias_test::test_gradient_accumulation",
           "alias_test::test_state_shape_dtype_shard_stability", "float64_test::test_mixed_dtype_input_outputs",
           "sharding_test::test_state_sharding_type_init_match_update",
           "sharding_test::test_state_sharding_type_preserved_with_jit")


@functools.lru_cache(maxsize=None)
def suite() -> dict:
    """The JSON written by ``_optax_suite.py``: jax version, device count, {case id: (outcome, message)}."""
    pytest.importorskip("optax")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    with tempfile.TemporaryDirectory(prefix="dualopt-optax-suite-") as tmp:
        out = Path(tmp) / "results.json"
        proc = subprocess.run([sys.executable, str(HERE / "_optax_suite.py"), str(out)], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=900)
        if not out.exists():
            pytest.fail(f"optax suite wrote no results (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_optax_own_optimizer_tests_pass_or_skip_with_a_reason():
    data = suite()
    assert data["devices"] == 8  # optax's sharding tests need their 8-device mesh
    results = data["results"]
    bad = {cid: m[-600:] for cid, (o, m) in results.items() if o == "failure"}
    assert bad == {}, bad
    for cid, (outcome, message) in results.items():
        assert outcome in ("passed", "skipped"), cid
        if outcome == "skipped":
            assert message.strip() and "\n" not in message.strip(), (cid, message)
    passed = {cid for cid, (o, _) in results.items() if o == "passed"}
    for direction in ("adam", "sgd"):
        for paradigm in ("none", "scratch", "finetune"):
            tag = f"{direction}-{paradigm}"
            for name in GENERIC:
                assert any(c.startswith(f"{name}[{tag}") for c in passed), (name, tag)
            # Plain Adam's / SGD's optimum is reached with the pull off, in every paradigm's code path.
            for target in ("_setup_parabola", "_setup_rosenbrock"):
                assert f"alias_test::test_optimization[{tag}-{target}-float32]" in passed, (tag, target)
            # optax compares jax versions as strings, which would skip these on jax 0.10; here they run.
            if paradigm != "finetune":
                assert f"sharding_test::test_init_with_abstract_input[{tag}]" in passed, tag


@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_finetune_on_one_bare_array_matches_the_same_array_in_a_dict(direction):
    """Found by optax's alias tests (params = one array): finetune ``init`` raised IndexError on the empty path."""
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt

    tx = dualopt(0.1, direction=direction, paradigm="finetune", rollback_max=0.5)
    p0 = jnp.asarray([1.0, -2.0, 3.0], jnp.float64)
    bare, boxed = p0, {"w": p0}
    s_bare, s_boxed = tx.init(bare), tx.init(boxed)
    for g in ([0.5, 0.25, -1.0], [-0.3, 0.1, 2.0], [0.7, -0.4, 0.2]):
        g = jnp.asarray(g, jnp.float64)
        u_bare, s_bare = tx.update(g, s_bare, bare)
        u_boxed, s_boxed = tx.update({"w": g}, s_boxed, boxed)
        bare, boxed = optax.apply_updates(bare, u_bare), optax.apply_updates(boxed, u_boxed)
        assert jnp.array_equal(bare, boxed["w"])
    assert jnp.array_equal(s_bare.anchor, p0)  # the anchor is the array itself, matching the params' structure
    assert not jnp.array_equal(bare, p0)

"""The Optax state of DualOpt through ``orbax.checkpoint``: anchors included, resume bitwise, with an abstract
template, without any template (Orbax hands back plain dicts and lists), and with sharded arrays."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
ocp = pytest.importorskip("orbax.checkpoint")
jnp = jax.numpy

from dualopt.optax import DualOptState, anchors, dualopt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def _problem() -> tuple[Any, Any, Any, Any]:
    key0, key1, key2 = jax.random.split(jax.random.key(0), 3)
    params = {"backbone": {f"Dense_{i}": {"kernel": 0.3 * jax.random.normal(k, (8, 8)), "bias": jnp.zeros(8)}
                           for i, k in enumerate(jax.random.split(key0, 3))},
              "head": {"kernel": 0.3 * jax.random.normal(key1, (8, 3)), "bias": jnp.zeros(3)}}
    x, y = jax.random.normal(key2, (64, 8)), jnp.arange(64) % 3

    def loss_fn(p: Any) -> Any:
        h = x
        for i in range(3):
            h = jnp.tanh(h @ p["backbone"][f"Dense_{i}"]["kernel"] + p["backbone"][f"Dense_{i}"]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"]["kernel"] + p["head"]["bias"], y).mean()

    opt = dualopt(optax.linear_schedule(1e-2, 1e-3, 2 * STEPS), paradigm={"backbone": "finetune", "head": "scratch"},
                  layer_index="module")
    tx = optax.chain(optax.clip_by_global_norm(1.0), opt)

    @jax.jit
    def step(p: Any, s: Any) -> Any:
        updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
        return optax.apply_updates(p, updates), s

    return params, opt, tx, step


def _run(step: Any, p: Any, s: Any, n: int) -> tuple[Any, Any]:
    for _ in range(n):
        p, s = step(p, s)
    return p, s


def _assert_bitwise(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and (x == y).all()


def test_orbax_resume_is_bitwise_with_and_without_a_template(tmp_path):
    pretrained, opt, tx, step = _problem()
    p, s = _run(step, pretrained, tx.init(pretrained), STEPS)
    checkpointer = ocp.StandardCheckpointer()
    path = tmp_path / "step8"
    checkpointer.save(path, {"params": p, "opt_state": s})
    checkpointer.wait_until_finished()
    whole = _run(step, p, s, STEPS)

    template = jax.eval_shape(lambda: {"params": p, "opt_state": s})
    restored = checkpointer.restore(path, template)
    _assert_bitwise((restored["params"], restored["opt_state"]), (p, s))
    _assert_bitwise(_run(step, restored["params"], restored["opt_state"], STEPS), whole)

    raw = checkpointer.restore(path)  # no template: the chain's tuple is a list, the NamedTuple a dict
    assert raw["opt_state"][0] is None and isinstance(raw["opt_state"][1], dict)
    state = (optax.EmptyState(), DualOptState(**raw["opt_state"][1]))
    found = anchors(opt, state[1], raw["params"])
    for name, layer in pretrained["backbone"].items():
        for leaf, value in layer.items():
            assert (found["backbone"][name][leaf] == value).all(), (name, leaf)
        assert not (raw["params"]["backbone"][name]["kernel"] == layer["kernel"]).all()  # trained away from it
    _assert_bitwise(_run(step, raw["params"], state, STEPS), whole)


SHARDED = textwrap.dedent("""
    import os, sys
    import numpy as np
    import jax, jax.numpy as jnp, optax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from dualopt.optax import anchors, dualopt

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    rows = NamedSharding(mesh, P("model", None))
    k0, k1 = jax.random.split(jax.random.key(0))
    # 512 x 256 > 65536 elements: the anchor keeps an array of its own, sharded like the kernel
    params = {"backbone": {"kernel": jax.device_put(0.05 * jax.random.normal(k0, (512, 256)), rows),
                           "bias": jax.device_put(jnp.zeros(256), NamedSharding(mesh, P()))},
              "head": {"kernel": jax.device_put(0.05 * jax.random.normal(k1, (256, 4)), rows)}}
    x = jax.random.normal(jax.random.key(2), (16, 512))
    opt = dualopt(1e-2, paradigm={"backbone": "finetune", "head": "scratch"}, layer_index="module")

    def loss_fn(p):
        h = jnp.tanh(x @ p["backbone"]["kernel"] + p["backbone"]["bias"])
        return jnp.mean((h @ p["head"]["kernel"]) ** 2)

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss_fn)(p), s, p)
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    for _ in range(3):
        p, s = step(p, s)
    big = [leaf for leaf in jax.tree.leaves(s) if getattr(leaf, "shape", None) == (512, 256)]
    assert len(big) == 3 and all(leaf.sharding.is_equivalent_to(rows, 2) for leaf in big), [l.sharding for l in big]
    ck = ocp.StandardCheckpointer()
    ck.save(sys.argv[1], {"params": p, "opt_state": s})
    ck.wait_until_finished()
    whole_p, whole_s = p, s
    for _ in range(3):
        whole_p, whole_s = step(whole_p, whole_s)

    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            {"params": p, "opt_state": s})
    r = ck.restore(sys.argv[1], template)
    for a, b in zip(jax.tree.leaves(r), jax.tree.leaves({"params": p, "opt_state": s})):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim) and (a == b).all()
    assert (anchors(opt, r["opt_state"], r["params"])["backbone"]["kernel"] == params["backbone"]["kernel"]).all()
    rp, rs = r["params"], r["opt_state"]
    for _ in range(3):
        rp, rs = step(rp, rs)
    for a, b in zip(jax.tree.leaves((rp, rs)), jax.tree.leaves((whole_p, whole_s))):
        assert (a == b).all()
    print("sharded resume bitwise")
""")


@pytest.mark.slow
@pytest.mark.distributed
def test_orbax_sharded_state_restores_with_its_shardings(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT),
               TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "ckpt")], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "sharded resume bitwise" in out.stdout

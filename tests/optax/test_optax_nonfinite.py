"""Non-finite gradients through ``dualopt.optax.dualopt`` under ``jax.jit`` (spec section 8, ``nonfinite="skip"``).

A NaN, +Inf or -Inf in one element of one gradient leaf makes the jitted
update change nothing: params, ``mu``, ``nu``, anchors and ``count`` keep their
bits and ``skipped`` grows by one. Then training goes on as if the bad call
had never been made: the run with bad calls inserted equals the clean run bit
for bit, after every clean call. Checked on both ways of applying the
transform (``tx.update`` + ``optax.apply_updates``, where a skipped call
returns ``-0.0`` updates; and :func:`dualopt.optax.step`), for Adam in float64,
float32 and bfloat16 (float32 moments and anchors) and Nesterov SGD, and
inside ``optax.chain`` after gradient clipping: ``clip_by_global_norm`` keeps a
non-finite gradient non-finite (the norm is NaN or Inf), so the call is
skipped; element-wise ``optax.clip`` turns +-Inf into finite values, which
DualOpt then applies (the check sees the gradients the chain hands to it),
while NaN stays NaN and is skipped.

float64 runs inside ``jax.enable_x64(True)`` (a context manager, so other
suites in the same process keep their setting).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from dualopt.optax import dualopt, step  # noqa: E402

from tests.common.adapters import same_bits  # noqa: E402

SHAPES = {"backbone": {"layers_0": {"w": (4, 3), "b": (3,)}, "layers_1": {"w": (3, 3), "b": (3,)}},
          "head": {"w": (3, 2), "b": (2,)}, "temperature": ()}
#: (leaf path, value): where each injection goes. One element of one leaf each time; the 0-d leaf included.
BAD = {"nan": (("backbone", "layers_0", "w"), math.nan), "inf": (("head", "b"), math.inf),
       "-inf": (("temperature",), -math.inf)}
N_CLEAN = 6
#: the first call of all is bad (state fresh from init), then bad calls between and after clean ones
SEQUENCE = ["nan", 0, 1, "inf", 2, 3, "-inf", "nan", 4, 5]


def _paradigm(path: tuple) -> str:
    return {"backbone": "finetune", "head": "scratch"}.get(path[0], "none")


def _tx(direction: str, nonfinite: str = "skip") -> Any:
    extra = dict(momentum=0.9, nesterov=True) if direction == "sgd" else {}
    return dualopt(0.05, direction=direction, paradigm=_paradigm, layer_index="module", rollback_max=4.0,
                   rollback_min=0.5, weight_decay=0.5, nonfinite=nonfinite, **extra)


@pytest.fixture(autouse=True)
def _x64() -> Iterator[None]:
    with jax.enable_x64(True):
        yield


def _tree(seed: int, dtype: Any, scale: float = 1.0) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def _with_bad(grads: Any, which: str) -> Any:
    path, value = BAD[which]
    leaf = grads
    for k in path:
        leaf = leaf[k]
    flat = leaf.reshape(-1)
    bad_leaf = flat.at[flat.size // 2].set(value).reshape(leaf.shape)
    out = jax.tree.map(lambda x: x, grads)  # a copy of the containers
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = bad_leaf
    return out


def _grads(dtype: Any) -> tuple[list[Any], dict[str, Any]]:
    clean = [_tree(100 + k, dtype) for k in range(N_CLEAN)]
    bad = {w: _with_bad(_tree(50 + i, dtype), w) for i, w in enumerate(BAD)}
    return clean, bad


def _same_tree(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(same_bits(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


def _kept(state: Any) -> tuple:
    """Everything a skipped call must leave alone (all of the state but the skip counter)."""
    return state.count, state.mu, state.nu, state.anchor


def _runner(tx: Any, how: str) -> Any:
    if how == "update":
        def one(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
    else:
        def one(params, state, grads):
            return step(tx, grads, state, params)
    return jax.jit(one)


def _run(tx: Any, how: str, params: Any, calls: list[Any]) -> tuple[list[tuple[Any, Any]], int]:
    """Every call's (params, state); asserts each bad call changed nothing. Returns the after-states and #bad."""
    one = _runner(tx, how)
    state = tx.init(params)
    out, n_bad = [], 0
    for grads in calls:
        new_params, new_state = one(params, state, grads)
        finite = all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
        if not finite:
            n_bad += 1
            assert _same_tree(new_params, params), "a skipped call changed the params"
            assert _same_tree(_kept(new_state), _kept(state)), "a skipped call changed mu, nu, anchor or count"
            assert int(new_state.skipped) == int(state.skipped) + 1
        else:
            assert int(new_state.skipped) == int(state.skipped)
            assert not _same_tree(new_params, params), "a clean call must move the params (else nothing is tested)"
        params, state = new_params, new_state
        out.append((params, state))
    return out, n_bad


CONFIGS = [
    pytest.param("adam", jnp.float64, id="adam-f64"),
    pytest.param("adam", jnp.float32, id="adam-f32"),
    pytest.param("adam", jnp.bfloat16, id="adam-bf16"),
    pytest.param("sgd", jnp.float32, id="sgd-nesterov-f32"),
]


@pytest.mark.parametrize("how", ["update", "step"])
@pytest.mark.parametrize(("direction", "dtype"), CONFIGS)
def test_bad_calls_change_nothing_and_training_resumes_exactly(direction, dtype, how):
    params = _tree(1, dtype)
    clean, bad = _grads(dtype)
    tx = _tx(direction)
    calls = [bad[c] if isinstance(c, str) else clean[c] for c in SEQUENCE]
    with_bad, n_bad = _run(tx, how, params, calls)
    straight, _ = _run(tx, how, params, clean)
    assert n_bad == 4
    after_clean = [s for c, s in zip(SEQUENCE, with_bad) if not isinstance(c, str)]
    for k, ((p, s), (p0, s0)) in enumerate(zip(after_clean, straight)):
        assert _same_tree(p, p0), f"params differ from the clean run after clean call {k}"
        assert _same_tree(_kept(s), _kept(s0)), f"state differs from the clean run after clean call {k}"
    final = with_bad[-1][1]
    assert int(final.count) == N_CLEAN and int(final.skipped) == 4
    # the spec's state dtypes survived the skips: float32 moments/anchors for bfloat16 params
    want = jnp.float32 if dtype == jnp.bfloat16 else dtype
    assert {x.dtype for x in jax.tree.leaves((final.mu, final.anchor))} == {jnp.dtype(want)}
    assert {x.dtype for x in jax.tree.leaves(with_bad[-1][0])} == {jnp.dtype(dtype)}


def _chain_run(clip: Any, calls: list[Any], params: Any) -> tuple[list[tuple[Any, Any]], list[bool]]:
    tx = optax.chain(clip, _tx("adam"))
    one = _runner(tx, "update")
    state = tx.init(params)
    out, skipped = [], []
    for grads in calls:
        new_params, new_state = one(params, state, grads)
        inner, inner_new = state[1], new_state[1]
        was_skipped = int(inner_new.skipped) == int(inner.skipped) + 1
        if was_skipped:
            assert _same_tree(new_params, params)
            assert _same_tree(_kept(inner_new), _kept(inner))
        skipped.append(was_skipped)
        params, state = new_params, new_state
        out.append((params, state))
    return out, skipped


def test_inside_a_chain_after_global_norm_clipping():
    """clip_by_global_norm(NaN or Inf) is still non-finite: every bad call is skipped, the rest equals the clean run."""
    params = _tree(1, jnp.float32)
    clean, bad = _grads(jnp.float32)
    clean = [jax.tree.map(lambda g: 10.0 * g, c) for c in clean]  # norms above 1: the clipping is active
    calls = [bad[c] if isinstance(c, str) else clean[c] for c in SEQUENCE]
    clip = optax.clip_by_global_norm(1.0)
    with_bad, skipped = _chain_run(clip, calls, params)
    straight, straight_skipped = _chain_run(clip, clean, params)
    assert skipped == [isinstance(c, str) for c in SEQUENCE] and not any(straight_skipped)
    after_clean = [s for c, s in zip(SEQUENCE, with_bad) if not isinstance(c, str)]
    for (p, s), (p0, s0) in zip(after_clean, straight):
        assert _same_tree(p, p0) and _same_tree(_kept(s[1]), _kept(s0[1]))
    assert int(with_bad[-1][1][1].skipped) == 4


def test_elementwise_clip_makes_inf_finite_and_keeps_nan():
    """optax.clip maps +-Inf to +-max_delta (a finite gradient: applied, not skipped); NaN stays NaN (skipped)."""
    params = _tree(1, jnp.float32)
    clean, bad = _grads(jnp.float32)
    calls = [clean[0], bad["inf"], bad["-inf"], bad["nan"]]
    _, skipped = _chain_run(optax.clip(0.5), calls, params)
    assert skipped == [False, False, False, True]


def test_propagate_under_jit_lets_nan_through_and_counts_nothing():
    params = _tree(1, jnp.float32)
    _, bad = _grads(jnp.float32)
    tx = _tx("adam", nonfinite="propagate")
    new_params, state = _runner(tx, "update")(params, tx.init(params), bad["nan"])
    assert bool(jnp.isnan(new_params["backbone"]["layers_0"]["w"]).any())
    assert bool(jnp.isfinite(new_params["head"]["w"]).all())  # no other leaf's gradient is touched
    assert int(state.skipped) == 0 and int(state.count) == 1

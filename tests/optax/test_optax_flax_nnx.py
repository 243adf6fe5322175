"""DualOpt under Flax NNX: ``nnx.Optimizer(model, dualopt(...), wrt=nnx.Param)`` with path-based paradigms.

The anchors are the model's pretrained state, the layer numbering (``layer_index="module"``) gives the same
rates as torch's for the same architecture, and an NNX training step equals plain Optax on the model's pure
param dict bit for bit."""

from __future__ import annotations

from typing import Any

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
jnp = jax.numpy

from dualopt.optax import anchors, dualopt, layer_rates  # noqa: E402

LR, STEPS = 1e-2, 5


class Net(nnx.Module):
    def __init__(self, rngs: Any) -> None:
        self.backbone = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), jnp.tanh, nnx.Linear(16, 16, rngs=rngs), jnp.tanh)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.head(self.backbone(x))


X = jax.random.normal(jax.random.key(1), (32, 8))
Y = jnp.arange(32) % 3


def _loss(model: Net) -> Any:
    return optax.softmax_cross_entropy_with_integer_labels(model(X), Y).mean()


@nnx.jit
def _nnx_step(model: Net, opt: Any) -> Any:
    loss, grads = nnx.value_and_grad(_loss)(model)
    opt.update(model, grads)
    return loss


def _pretrained() -> Net:
    """A model 'pretrained' for a few Adam steps, so its state differs from the initialisation."""
    model = Net(nnx.Rngs(0))
    pre = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    for _ in range(3):
        _nnx_step(model, pre)
    return model


def _tx() -> Any:
    return dualopt(LR, paradigm=lambda path: "scratch" if path[0] == "head" else "finetune",
                   layer_index="module", rollback_max=1.0)


def test_nnx_optimizer_anchors_are_the_pretrained_state():
    model = _pretrained()
    pretrained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = _tx()
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(STEPS):
        _nnx_step(model, opt)
    state, params = nnx.as_pure(opt.opt_state), nnx.as_pure(nnx.state(model, nnx.Param))
    assert int(state.count) == STEPS and int(state.skipped) == 0
    found = anchors(tx, state, params)
    assert set(found) == {"backbone"}  # the scratch head has no anchor
    for i in (0, 2):
        for leaf in ("kernel", "bias"):
            got, want = found["backbone"]["layers"][str(i)][leaf], pretrained["backbone"]["layers"][i][leaf]
            assert (got == want).all(), (i, leaf)
            assert not (params["backbone"]["layers"][i][leaf] == want).all()


def test_nnx_layer_numbering_agrees_with_torch():
    torch = pytest.importorskip("torch")
    from dualopt.torch import DualOpt

    params = nnx.as_pure(nnx.state(Net(nnx.Rngs(0)), nnx.Param))
    rates = {k: float(v) for k, v in layer_rates(_tx(), params).items()}
    tnet = torch.nn.Sequential()
    tnet.add_module("backbone", torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16)))
    tnet.add_module("head", torch.nn.Linear(16, 3))
    trates = DualOpt.for_finetuning(tnet, head="head", lr=LR, rollback_max=1.0, layer_index="module").layer_rates()
    names = {"weight": "kernel", "bias": "bias"}
    translated = {}
    for name, rate in trates.items():
        *mod, leaf = name.split(".")
        path = "/".join(mod[:1] + ["layers"] + mod[1:] if mod[0] == "backbone" else mod)
        translated[f"{path}/{names[leaf]}"] = rate
    assert rates == translated
    assert rates["backbone/layers/0/kernel"] == 1.0 and rates["backbone/layers/2/bias"] == 0.0


def test_nnx_step_equals_plain_optax_on_the_pure_dict():
    model = _pretrained()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, _tx(), wrt=nnx.Param)

    plain = dualopt(LR, paradigm={"backbone": "finetune", "head": "scratch"}, layer_index="module", rollback_max=1.0)
    state = plain.init(params)

    @jax.jit
    def plain_step(params: Any, state: Any) -> Any:
        def loss(p: Any) -> Any:
            m = Net(nnx.Rngs(0))  # a model of this trace, its params replaced by p
            st = nnx.state(m, nnx.Param)
            nnx.replace_by_pure_dict(st, p)
            nnx.update(m, st)
            return _loss(m)

        updates, state = plain.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(STEPS):
        _nnx_step(model, opt)
        params, state = plain_step(params, state)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert (a == b).all()

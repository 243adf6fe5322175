"""How the reliability suite drives each adapter (torch and Optax in-process; Keras in its worker).

``construct_*`` build an optimizer the way a user would for one bad-input case
of :mod:`tests.common.cases` and return the error message (or None if the
adapter accepted the input). The Keras twin lives in ``tests/keras/_reliability_checks.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.common.cases import PARAM_SHAPES, BadInput, adapter_kwargs, saved_setup


def construct_torch(case: BadInput) -> str | None:
    import torch

    from dualopt.torch import DualOpt

    kw = adapter_kwargs(case, "torch")
    if "anchor" in kw:
        kw["anchor"] = [None if a is None else torch.from_numpy(a) for a in kw["anchor"]]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in PARAM_SHAPES]
    try:
        DualOpt(params, **kw)
    except Exception as e:  # the message is asserted on by the caller, whatever the type
        return f"{type(e).__name__}: {e}"
    return None


def construct_optax(case: BadInput) -> str | None:
    """``dualopt(...)`` then ``init`` on a list of two float32 leaves (validation may happen in either)."""
    import jax.numpy as jnp

    from dualopt.optax import dualopt

    kw = adapter_kwargs(case, "optax")
    lr = kw.pop("learning_rate")
    params = [jnp.zeros(s, jnp.float32) for s in PARAM_SHAPES]
    try:
        dualopt(lr, **kw).init(params)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _message(fn: Any) -> str | None:
    try:
        fn()
    except Exception as e:  # the message is asserted on by the caller, whatever the type
        return f"{type(e).__name__}: {e}"
    return None


def load_torch_state(case: BadInput) -> tuple[str | None, bool]:
    """Load the state that ``case`` describes into a stepped default DualOpt: (message, state untouched)."""
    import copy

    import torch

    from dualopt.torch import DualOpt

    def stepped(shapes: tuple, make: Any) -> torch.optim.Optimizer:
        params = [torch.nn.Parameter(torch.arange(float(np.prod(s))).reshape(s)) for s in shapes]
        opt = make(params)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()  # so that the moments (and anchors) exist and are not zero
        return opt

    setup = saved_setup(case)
    if setup is None:
        source = stepped(PARAM_SHAPES, lambda ps: torch.optim.Adam(ps, lr=1e-3))
    else:
        kw = adapter_kwargs(BadInput("saved", changes=setup[1]), "torch")
        source = stepped(setup[0], lambda ps: DualOpt(ps, **kw))
    target = stepped(PARAM_SHAPES, lambda ps: DualOpt(ps, lr=1e-3))
    before = copy.deepcopy(target.state_dict())
    msg = _message(lambda: target.load_state_dict(source.state_dict()))
    return msg, same_tree(before, target.state_dict())


def load_optax_state(case: BadInput) -> tuple[str | None, bool]:
    """Pass the state that ``case`` describes to a default dualopt's update, eagerly and under jit.

    The state is a value (nothing to leave untouched), so the flag says whether
    the jitted update raised the same message as the eager one (at trace time).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from dualopt.optax import dualopt

    def stepped(shapes: tuple, tx: Any) -> Any:
        params = [jnp.arange(float(np.prod(s)), dtype=jnp.float32).reshape(s) for s in shapes]
        state = tx.init(params)
        return tx.update([jnp.ones_like(p) for p in params], state, params)[1]

    setup = saved_setup(case)
    if setup is None:
        state = stepped(PARAM_SHAPES, optax.adam(1e-3))
    else:
        kw = adapter_kwargs(BadInput("saved", changes=setup[1]), "optax")
        state = stepped(setup[0], dualopt(kw.pop("learning_rate"), **kw))
    tx = dualopt(1e-3)
    params = [jnp.zeros(s, jnp.float32) for s in PARAM_SHAPES]
    grads = [jnp.ones(s, jnp.float32) for s in PARAM_SHAPES]
    eager = _message(lambda: tx.update(grads, state, params))
    jitted = _message(lambda: jax.jit(tx.update)(grads, state, params))
    return eager, eager == jitted


def same_tree(a: Any, b: Any) -> bool:
    """Bitwise equality of nested dicts/lists of tensors, arrays and plain values (torch tensors included)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    if hasattr(a, "detach"):
        return hasattr(b, "detach") and same_bits(a.detach().cpu().numpy(), b.detach().cpu().numpy())
    if isinstance(a, np.ndarray):
        return same_bits(a, b)
    return type(a) is type(b) and a == b


def error_text(result: str | None) -> tuple[str | None, str | None]:
    """``"Type: message"`` -> ``(type, message)``."""
    if result is None:
        return None, None
    kind, _, msg = result.partition(": ")
    return kind, msg


def bits(a: Any) -> np.ndarray:
    """The raw bytes of an array as unsigned ints (NaN payloads and -0.0 included)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else a.view(np.uint8)


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))

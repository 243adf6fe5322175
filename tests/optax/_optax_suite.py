"""Optax's own optimizer tests, imported from the installed wheel, run against ``dualopt.optax.dualopt``.

Run as ``python tests/optax/_optax_suite.py OUT.json`` (a fresh process: the
sharding tests need eight host devices, set through ``XLA_FLAGS`` before jax
starts, and optax's tests expect x64 off and switch it globally);
``test_optax_own_suite.py`` does so and asserts on the JSON written.

Optax's tests are parametrized over its optimizers at import time, so the list
cannot be swapped after import. Each generated test method keeps the original
test function (``functools.wraps``: ``__wrapped__``); this module calls that
original, unchanged, on an instance of optax's test class with DualOpt where
optax passes an optimizer (``sharding_test``, ``float64_test``) or with
optax's ``alias`` module seen through a proxy whose ``adam`` / ``sgd`` build
DualOpt (``alias_test``, which looks optimizers up by name).

Each case runs for both directions and the three paradigms. A convergence test
(``test_optimization``) expects plain Adam's / SGD's optimum, so there the pull
is switched off (``weight_decay=0`` / ``rollback_max=0``); everywhere else the
pull is on (finetune with an explicit ``rollback_max``, which
``inject_hyperparams`` needs: its learning rate is an array).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import types
import unittest
from typing import Any, Callable

# Before jax starts: optax's sharding tests build an 8-device mesh on the host.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.pop("JAX_ENABLE_X64", None)

import jax  # noqa: E402

if "sklearn" not in sys.modules:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        # alias_test imports scikit-learn at module level for its L-BFGS logistic-regression cases only,
        # which do not apply to DualOpt; empty modules let the generic cases import.
        for _name in ("sklearn", "sklearn.datasets", "sklearn.linear_model"):
            sys.modules[_name] = types.ModuleType(_name)

from optax._src import alias as optax_alias  # noqa: E402
from optax._src import alias_test, float64_test, sharding_test  # noqa: E402

from dualopt.optax import dualopt  # noqa: E402

DIRECTIONS = ("adam", "sgd")
PARADIGMS = ("none", "scratch", "finetune")
#: Pull on (the paradigm's own rule) and pull off (values of plain Adam / SGD).
PULL_ON = {"none": {}, "scratch": {"weight_decay": 1e-2}, "finetune": {"rollback_max": 0.1}}
PULL_OFF = {"none": {}, "scratch": {"weight_decay": 0.0}, "finetune": {"rollback_max": 0.0}}

_COMPLEX = ("optax runs this case on complex params, which DualOpt refuses with a clear error (spec section 7; "
            "checked here)")


def factory(direction: str, paradigm: str, pull: dict[str, dict[str, Any]]) -> Callable[..., Any]:
    """DualOpt under optax's name and signature for ``adam`` / ``sgd`` (optax's SGD default: no momentum).

    ``inject_hyperparams`` reads the factory's signature, so the arguments are spelled out.
    """
    extra = {"paradigm": paradigm, **pull[paradigm]}
    if direction == "adam":
        def adam(learning_rate: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Any:
            return dualopt(learning_rate, direction="adam", b1=b1, b2=b2, eps=eps, **extra)
        return adam

    def sgd(learning_rate: Any, momentum: Any = None, nesterov: bool = False) -> Any:
        return dualopt(learning_rate, direction="sgd", momentum=0.0 if momentum is None else momentum,
                       nesterov=nesterov, **extra)
    return sgd


def refuses_abstract(make: Callable[..., Any]) -> tuple[str, str]:
    """Finetune anchors are the params' values, so abstract params cannot give them; check the refusal."""
    import jax.numpy as jnp

    from decoupled_core import HyperparameterError

    try:
        make(1.0).init(jax.ShapeDtypeStruct((2, 4, 8), jnp.float32))
    except HyperparameterError as exc:
        if "anchor" in str(exc) and "eval_shape" in str(exc):
            return "skipped", ("finetune anchors are the params' values: init refuses abstract params with a "
                               "clear error naming jax.eval_shape and anchor= (by design; checked here)")
        return "failure", f"abstract params refused without saying what to do: {exc!r}"
    return "failure", "finetune init accepted abstract params, which hold no anchor values"


def rejects_complex(make: Callable[..., Any]) -> tuple[str, str]:
    """Optax's complex cases cannot apply; check instead that DualOpt refuses complex params clearly."""
    import jax.numpy as jnp

    try:
        make(0.1).init(jnp.zeros(3, jnp.complex64))
    except (ValueError, TypeError) as exc:
        if "complex" in str(exc):
            return "skipped", _COMPLEX
        return "failure", f"complex params refused without saying why: {exc!r}"
    return "failure", "complex params were accepted (spec section 7 rejects them)"


class AliasProxy(types.ModuleType):
    """optax's ``alias`` module, with ``adam`` and ``sgd`` building DualOpt."""

    def __init__(self, makers: dict[str, Callable[..., Any]]) -> None:
        super().__init__("optax._src.alias")
        self.__dict__.update(makers)

    def __getattr__(self, name: str) -> Any:
        return getattr(optax_alias, name)


class _NumericVersion(str):
    """A version string whose ``<`` compares numbers: optax compares ``jax.__version__`` as a string,
    and ``"0.10.2" < "0.7.2"`` would skip its sharding-in-types tests on jax 0.10."""

    @staticmethod
    def _key(text: str) -> tuple[int, ...]:
        return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:3])

    def __lt__(self, other: object) -> bool:
        return self._key(str(self)) < self._key(str(other))


class _JaxView(types.ModuleType):
    """``jax`` as sharding_test sees it: everything from jax, the version comparable as numbers."""

    __version__ = _NumericVersion(jax.__version__)

    def __getattr__(self, name: str) -> Any:
        return getattr(jax, name)


def original(cls: type, name: str) -> Callable[..., Any]:
    """The undecorated test function ``name`` of an absl parameterized test class."""
    for attr, value in vars(cls).items():
        if attr.startswith(name) and getattr(getattr(value, "__wrapped__", None), "__name__", None) == name:
            return value.__wrapped__
    raise LookupError(f"{cls.__name__}.{name} not found in the installed optax")


def run_case(cls: type, name: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    """Run one case; (outcome, message) with outcome in passed / skipped / failure."""
    fn = original(cls, name)
    method = next(a for a in vars(cls) if a.startswith(name) and callable(vars(cls)[a]))
    test = cls(method)
    x64 = jax.config.jax_enable_x64
    try:
        fn(test, **kwargs)
    except unittest.SkipTest as exc:
        return "skipped", str(exc)
    except Exception:  # noqa: BLE001  (any exception is the case's failure, reported to the outer test)
        return "failure", traceback.format_exc()[-3000:]
    finally:
        jax.config.update("jax_enable_x64", x64)  # float64_test switches it globally
    return "passed", ""


def cases() -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    """(case id, thunk) for every case; a case that cannot apply returns ``("skipped", reason)``."""
    import jax.numpy as jnp

    out: list[tuple[str, Callable[[], tuple[str, str]]]] = []
    kwargs_of = {e["opt_name"]: e["opt_kwargs"] for e in alias_test._OPTIMIZERS_UNDER_TEST
                 if e["opt_name"] in DIRECTIONS}
    for direction in DIRECTIONS:
        for paradigm in PARADIGMS:
            tag = f"{direction}-{paradigm}"
            on = AliasProxy({d: factory(d, paradigm, PULL_ON) for d in DIRECTIONS})
            off = AliasProxy({d: factory(d, paradigm, PULL_OFF) for d in DIRECTIONS})
            common = {"opt_name": direction, "opt_kwargs": dict(kwargs_of[direction])}

            def alias_case(name: str, proxy: AliasProxy, common: dict[str, Any] = common,
                           **kw: Any) -> Callable[[], tuple[str, str]]:
                def thunk() -> tuple[str, str]:
                    saved = alias_test.alias
                    alias_test.alias = proxy
                    try:
                        return run_case(alias_test.AliasTest, name, {**common, **kw})
                    finally:
                        alias_test.alias = saved
                return thunk

            for target in (alias_test._setup_parabola, alias_test._setup_rosenbrock):
                for dtype in (jnp.float32, jnp.complex64):
                    cid = f"alias_test::test_optimization[{tag}-{target.__name__}-{jnp.dtype(dtype).name}]"
                    if jnp.iscomplexobj(dtype):
                        out.append((cid, lambda make=on.__dict__[direction]: rejects_complex(make)))
                    else:
                        out.append((cid, alias_case("test_optimization", off, target=target, dtype=dtype)))
            out.append((f"alias_test::test_optimizers_accept_extra_args[{tag}]",
                        alias_case("test_optimizers_accept_extra_args", on)))
            out.append((f"alias_test::test_optimizers_can_be_wrapped_in_inject_hyperparams[{tag}]",
                        alias_case("test_optimizers_can_be_wrapped_in_inject_hyperparams", on)))
            out.append((f"alias_test::test_explicit_dtype[{tag}]", lambda: (
                "skipped", "optax's mu_dtype / accumulator_dtype arguments; DualOpt's state dtype follows "
                "the params by design (float32 moments for low-precision params)")))
            for dtype in ("bfloat16", "float32"):
                out.append((f"alias_test::test_preserve_dtype[{tag}-{dtype}]",
                            alias_case("test_preserve_dtype", on, dtype=dtype)))
                out.append((f"alias_test::test_gradient_accumulation[{tag}-{dtype}]",
                            alias_case("test_gradient_accumulation", on, dtype=dtype)))
            for dtype in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64, jnp.complex64, jnp.complex128):
                cid = f"alias_test::test_state_shape_dtype_shard_stability[{tag}-{jnp.dtype(dtype).name}]"
                if jnp.iscomplexobj(dtype):
                    out.append((cid, lambda make=on.__dict__[direction]: rejects_complex(make)))
                else:
                    out.append((cid, alias_case("test_state_shape_dtype_shard_stability", on, dtype=dtype)))

            make = factory(direction, paradigm, PULL_ON)
            out.append((f"float64_test::test_mixed_dtype_input_outputs[{tag}]", lambda make=make: run_case(
                float64_test.Float64Test, "test_mixed_dtype_input_outputs",
                {"transform_constr": make, "transform_kwargs": {"learning_rate": 0.1}})))
            for name in ("test_init_with_abstract_input", "test_state_sharding_type_init_match_update",
                         "test_state_sharding_type_preserved_with_jit"):
                def sharding_case(name: str = name, make: Callable[..., Any] = make,
                                  paradigm: str = paradigm) -> tuple[str, str]:
                    if paradigm == "finetune" and name == "test_init_with_abstract_input":
                        return refuses_abstract(make)
                    saved = sharding_test.jax
                    sharding_test.jax = _JaxView("jax")
                    try:
                        return run_case(sharding_test.ShardingTest, name, {"optimizer": make(1.0)})
                    finally:
                        sharding_test.jax = saved
                out.append((f"sharding_test::{name}[{tag}]", sharding_case))
    return out


def main(path: str, only: str = "") -> int:
    results = {}
    for cid, thunk in cases():
        if only and only not in cid:
            continue
        results[cid] = thunk()
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"jax": jax.__version__, "devices": jax.device_count(), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

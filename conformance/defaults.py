"""Case "same architecture, default settings": one model, built natively in every framework, same numbers.

The vectors and the closed loop pass their layer keys explicitly; this case
does not. A small MLP and a small conv-plus-norm model are built the idiomatic
way in each framework (torch ``nn.Sequential``; Keras ``Sequential`` for the
MLP and a functional model for the conv one, on jax, torch and tensorflow; a
Flax-style param dict for Optax: ``Dense_N`` like linen's auto-names, and
``layers_N`` like linen's ``nn.Sequential``), hold identical float64 initial
weights, and get a DualOpt with nothing but ``lr`` and the paradigm, so the
layer numbering is each adapter's *default* (spec section 3). Each must report
the same rate table as the core with the canonical order and, after
:data:`STEPS` steps with the same gradients, the same weights.

Tensors are named and shaped canonically (Keras / Flax layout: a dense kernel
is ``(in, out)``, a conv kernel ``(h, w, in, out)``); torch's ``Linear.weight``
and ``Conv2d.weight`` are transposed on the way in and out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from decoupled_core import HyperParams, ReferenceOptimizer

from .keras_process import keras_setup, run, serve

__all__ = ["MODELS", "SETTINGS", "STEPS", "LR", "DefaultsResult", "reference", "run_torch", "run_optax",
           "run_keras", "check_defaults", "render"]

LR = 1e-2
STEPS = 3
#: Settings given to every adapter: only the paradigm; rollback_max, weight_decay and layer_index are defaults.
SETTINGS = ("finetune", "scratch")
#: model -> canonical tensors (name, shape), in the canonical order of spec section 3.
MODELS: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "mlp": [("dense_0/kernel", (5, 4)), ("dense_0/bias", (4,)), ("dense_1/kernel", (4, 3)), ("dense_1/bias", (3,))],
    "convnorm": [("conv_0/kernel", (3, 3, 2, 3)), ("conv_0/bias", (3,)), ("norm/scale", (3,)),
                 ("norm/offset", (3,)), ("conv_1/kernel", (1, 1, 3, 2)), ("conv_1/bias", (2,))],
}
#: The Flax-style param dict path of every canonical tensor.
FLAX_PATHS = {
    "mlp": {"dense_0/kernel": ("Dense_0", "kernel"), "dense_0/bias": ("Dense_0", "bias"),
            "dense_1/kernel": ("Dense_1", "kernel"), "dense_1/bias": ("Dense_1", "bias")},
    "convnorm": {"conv_0/kernel": ("layers_0", "kernel"), "conv_0/bias": ("layers_0", "bias"),
                 "norm/scale": ("layers_1", "scale"), "norm/offset": ("layers_1", "bias"),
                 "conv_1/kernel": ("layers_2", "kernel"), "conv_1/bias": ("layers_2", "bias")},
}

Run = dict[str, Any]  # {"rates": [float per tensor], "weights": [{name: array} per step]}


def weights_and_grads(model: str, seed: int = 7) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Initial weights and :data:`STEPS` gradients of ``model``, canonical layout, float64."""
    rng = np.random.Generator(np.random.PCG64(seed + len(model)))
    init = {n: rng.standard_normal(s) for n, s in MODELS[model]}
    grads = [{n: rng.standard_normal(s) for n, s in MODELS[model]} for _ in range(STEPS)]
    return init, grads


def reference(model: str, paradigm: str) -> Run:
    """The core, tensors in canonical order, default hyperparameters and layer keys."""
    init, grads = weights_and_grads(model)
    names = [n for n, _ in MODELS[model]]
    opt = ReferenceOptimizer([init[n].copy() for n in names], [HyperParams(paradigm=paradigm)] * len(names),
                             base_lr=LR, xp=np)
    rates = [float(r) for r in opt.rates]
    out = []
    for g in grads:
        opt.step([g[n] for n in names], lr=LR)
        out.append({n: np.array(p) for n, p in zip(names, opt.params)})
    return {"rates": rates, "weights": out}


# ----------------------------------------------------------------------------- torch
def _torch_layout(name: str, a: np.ndarray) -> np.ndarray:
    if name.endswith("kernel"):
        return a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1)
    return a


def _from_torch_layout(name: str, a: np.ndarray) -> np.ndarray:
    if name.endswith("kernel"):
        return a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0)
    return a


def run_torch(model: str, paradigm: str) -> Run:
    import torch

    from dualopt.torch import DualOpt

    if model == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 1))
    net = net.double()
    names = [n for n, _ in MODELS[model]]
    params = list(net.parameters())  # nn.Module order; the canonical order by spec section 3
    init, grads = weights_and_grads(model)
    with torch.no_grad():
        for p, n in zip(params, names):
            p.copy_(torch.from_numpy(np.ascontiguousarray(_torch_layout(n, init[n]))))
    opt = DualOpt(net.named_parameters(), lr=LR, paradigm=paradigm)
    rates = [float(r) for r in opt.layer_rates().values()]
    out = []
    for g in grads:
        for p, n in zip(params, names):
            p.grad = torch.from_numpy(np.ascontiguousarray(_torch_layout(n, g[n])))
        opt.step()
        out.append({n: _from_torch_layout(n, p.detach().numpy().copy()) for p, n in zip(params, names)})
    return {"rates": rates, "weights": out}


# ----------------------------------------------------------------------------- optax
def run_optax(model: str, paradigm: str) -> Run:
    import jax
    import jax.numpy as jnp

    from dualopt.optax import dualopt, layer_rates, path_str, step

    with jax.enable_x64(True):
        init, grads = weights_and_grads(model)
        paths = FLAX_PATHS[model]

        def tree(values: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for n, (mod, leaf) in paths.items():
                out.setdefault(mod, {})[leaf] = jnp.asarray(values[n], dtype=jnp.float64)
            return out

        params = tree(init)
        tx = dualopt(LR, paradigm=paradigm)
        by_path = layer_rates(tx, params)
        rates = [float(by_path[path_str(paths[n])]) for n, _ in MODELS[model]]
        state = tx.init(params)
        out = []
        for g in grads:
            params, state = step(tx, tree(g), state, params)
            out.append({n: np.asarray(params[m][leaf]) for n, (m, leaf) in paths.items()})
    return {"rates": rates, "weights": out}


# ----------------------------------------------------------------------------- keras (worker process)
def keras_worker(payload: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Run]:
    """Runs inside a Keras worker process whose backend is already chosen."""
    import keras

    from dualopt.keras import DualOpt

    out = {}
    for model, paradigm in payload:
        if model == "mlp":  # Sequential
            net = keras.Sequential([keras.Input((5,), dtype="float64"), keras.layers.Dense(4, dtype="float64"),
                                    keras.layers.Dense(3, dtype="float64")])
        else:  # functional
            x = keras.Input((6, 6, 2), dtype="float64")
            h = keras.layers.Conv2D(3, 3, dtype="float64")(x)
            h = keras.layers.BatchNormalization(dtype="float64")(h)
            net = keras.Model(x, keras.layers.Conv2D(2, 1, dtype="float64")(h))
        variables = list(net.trainable_variables)
        names = [n for n, _ in MODELS[model]]
        init, grads = weights_and_grads(model)
        for v, n in zip(variables, names):
            v.assign(init[n])
        opt = DualOpt(learning_rate=LR, paradigm=paradigm)
        opt.build(variables)
        rates = [float(r) for r in opt.layer_rates().values()]
        steps = []
        for g in grads:
            opt.apply([g[n] for n in names], variables)
            steps.append({n: np.array(keras.ops.convert_to_numpy(v)) for v, n in zip(variables, names)})
        out[(model, paradigm)] = {"rates": rates, "weights": steps}
    return out


def _keras_request(command: str, payload: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Run]:
    if command != "defaults":
        raise ValueError(f"command={command!r} is invalid: expected 'defaults'.")
    keras_setup("float64")
    return keras_worker(payload)


def run_keras(backend: str, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Run]:
    # The child serves through _keras_request (this module's --keras-worker entry), not the whole case.
    return run(backend, "dualopt.conformance.defaults", ["--keras-worker", "defaults"], list(pairs), timeout=600.0)


# ----------------------------------------------------------------------------- the check
#: Relative tolerance of the weights: float64, three steps; torch's CPU sqrt is 1 ulp off on some elements
#: (spec/TOLERANCES.md) and Keras computes its scalars on the device, so not bitwise.
RTOL = 1e-12


@dataclass
class DefaultsResult:
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["verdict"] in ("PASS", "SKIPPED") for r in self.rows)


def _compare(ref: Run, got: Run) -> tuple[bool, float, str]:
    if got["rates"] != ref["rates"]:
        return False, float("inf"), f"rates {['%.6g' % r for r in got['rates']]} != {['%.6g' % r for r in ref['rates']]}"
    worst = 0.0
    for want, have in zip(ref["weights"], got["weights"]):
        for n, w in want.items():
            h = np.asarray(have[n])
            if h.shape != w.shape:
                return False, float("inf"), f"{n}: shape {h.shape} != {w.shape}"
            worst = max(worst, float(np.max(np.abs(h - w) / np.maximum(np.abs(w), 1e-300), initial=0.0)))
    return worst <= RTOL, worst, ""


def _frameworks(selected: Callable[[str], bool]) -> list[str]:
    names = ["torch", "optax", "keras[jax]", "keras[torch]", "keras[tensorflow]"]
    return [n for n in names if selected(n)]


def check_defaults(selected: Callable[[str], bool] = lambda name: True,
                   progress: Any = None) -> DefaultsResult:
    """Run the case in every selected framework; one row per (framework, model, paradigm)."""
    import importlib.util

    pairs = [(m, p) for m in MODELS for p in SETTINGS]
    refs = {pair: reference(*pair) for pair in pairs}
    result = DefaultsResult()
    for fw in _frameworks(selected):
        needed = {"torch": ["torch"], "optax": ["jax", "optax"]}.get(fw, ["keras", fw[6:-1]])
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            result.rows += [dict(framework=fw, model=m, paradigm=p, verdict="SKIPPED", err=None,
                                 note=f"{missing[0]} not installed") for m, p in pairs]
            continue
        if progress is not None:
            print(f"[defaults] {fw} ...", file=progress, flush=True)
        try:
            if fw == "torch":
                runs = {pair: run_torch(*pair) for pair in pairs}
            elif fw == "optax":
                runs = {pair: run_optax(*pair) for pair in pairs}
            else:
                runs = run_keras(fw[6:-1], pairs)
        except Exception as exc:  # a crash is a failure of every row, with the reason
            result.rows += [dict(framework=fw, model=m, paradigm=p, verdict="FAIL", err=None,
                                 note=f"{type(exc).__name__}: {str(exc)[-300:]}") for m, p in pairs]
            continue
        for pair in pairs:
            ok, err, note = _compare(refs[pair], runs[pair])
            result.rows.append(dict(framework=fw, model=pair[0], paradigm=pair[1], verdict="PASS" if ok else "FAIL",
                                    err=err, note=note, rates=runs[pair]["rates"]))
    return result


def render(result: DefaultsResult) -> str:
    """The case's table: one row per framework, model and paradigm, with the rate table it reported."""
    lines = ["", "Same architecture, default settings (rates and 3 float64 steps vs the core, canonical order)",
             f"{'verdict':8s} {'framework':18s} {'model':9s} {'paradigm':9s} {'max rel err':>12s}  rates / note"]
    for r in result.rows:
        err = "" if r["err"] is None else ("inf" if not np.isfinite(r["err"]) else f"{r['err']:.2e}")
        rates = " ".join(f"{x:.4g}" for x in r.get("rates", []))
        lines.append(f"{r['verdict']:8s} {r['framework']:18s} {r['model']:9s} {r['paradigm']:9s} {err:>12s}  "
                     f"{r['note'] or rates}")
    n_pass = sum(r["verdict"] == "PASS" for r in result.rows)
    n_fail = sum(r["verdict"] == "FAIL" for r in result.rows)
    lines.append(f"defaults: {n_pass} passed, {n_fail} failed, "
                 f"{sum(r['verdict'] == 'SKIPPED' for r in result.rows)} skipped")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a manual entry point, and the Keras worker's
    if sys.argv[1:2] == ["--keras-worker"]:
        sys.exit(serve(sys.argv[2:], _keras_request))
    res = check_defaults(progress=sys.stderr)
    print(render(res))
    sys.exit(0 if res.ok else 1)

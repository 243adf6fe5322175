"""Generate the spec's test vectors from the reference core: ``python -m dualopt.spec.generate_vectors``.

``--check`` regenerates in memory and exits non-zero if any committed file
differs (the test suite runs this). Inputs come from a seeded PCG64 stream;
expected values come from :class:`decoupled_core.ReferenceOptimizer` on numpy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from decoupled_core import HyperParams, ReferenceOptimizer

from . import VECTORS_DIR
from .vectors import Case, TensorSpec, case_to_json, vector_files

DTYPES = ("float64", "float32")


def _case(name: str, description: str, *, groups: list[HyperParams], tensors: list[tuple[str, tuple[int, ...], int]],
          steps: int = 12, base_lr: float = 1e-2, lr: Callable[[int], float] | None = None,
          layer_index: list[int] | None = None, scale: float = 1.0, grad_scale: float | None = None,
          anchor_offset: float | None = None, nonfinite_steps: dict[int, tuple[str, float]] | None = None,
          missing_grads: dict[int, list[str]] | None = None, seed: int = 0, features: tuple[str, ...] = ()) -> dict[str, Any]:
    return dict(name=name, description=description, groups=groups, tensors=tensors, steps=steps, base_lr=base_lr,
                lr=lr, layer_index=layer_index, scale=scale, grad_scale=grad_scale if grad_scale is not None else scale,
                anchor_offset=anchor_offset, nonfinite_steps=nonfinite_steps or {}, missing_grads=missing_grads or {},
                seed=seed, features=list(features))


def _warmup_cosine(base: float, steps: int) -> Callable[[int], float]:
    def f(t: int) -> float:  # t = 1..steps
        if t <= 3:
            return base * t / 3
        return base * 0.5 * (1.0 + math.cos(math.pi * (t - 3) / (steps - 3)))
    return f


FT = lambda **kw: HyperParams(paradigm="finetune", **kw)  # noqa: E731
SC = lambda **kw: HyperParams(paradigm="scratch", **kw)  # noqa: E731
NO = lambda **kw: HyperParams(paradigm="none", **kw)  # noqa: E731
MLP = [("w0", (4, 3), 0), ("b0", (3,), 0), ("w1", (3, 2), 0), ("b1", (2,), 0)]


def cases() -> list[dict[str, Any]]:
    return [
        _case("adam_scratch", "Adam, scratch, 4 layers: rho rises with depth", groups=[SC(weight_decay=0.5)], tensors=MLP),
        _case("adam_finetune_p1", "Adam, finetune, p=1, default-style kappa", groups=[FT(rollback_max=2.0)], tensors=MLP,
              anchor_offset=0.3),
        _case("adam_finetune_p05", "Adam, finetune, fractional p=0.5", groups=[FT(rollback_max=2.0, rollback_power=0.5)],
              tensors=MLP, anchor_offset=0.3),
        _case("adam_finetune_p2_kmin", "Adam, finetune, p=2 and kappa_min>0",
              groups=[FT(rollback_max=3.0, rollback_min=0.5, rollback_power=2.0)], tensors=MLP, anchor_offset=0.3),
        _case("adam_finetune_L1", "Adam, finetune with a single layer (rho = kappa_max)",
              groups=[FT(rollback_max=4.0, rollback_min=1.0)], tensors=[("w", (5,), 0)], anchor_offset=-0.2),
        _case("adam_none", "Adam with no pull (must equal plain Adam)", groups=[NO()], tensors=MLP),
        _case("sgd_scratch", "SGD momentum, scratch", groups=[SC(direction="sgd", weight_decay=0.5)], tensors=MLP),
        _case("sgd_finetune", "SGD momentum, finetune", groups=[FT(direction="sgd", rollback_max=2.0)], tensors=MLP,
              anchor_offset=0.3),
        _case("sgd_nesterov_mixed", "SGD Nesterov; finetune backbone, scratch head",
              groups=[FT(direction="sgd", nesterov=True, momentum=0.8, rollback_max=2.0),
                      SC(direction="sgd", nesterov=True, momentum=0.8, weight_decay=1.0)],
              tensors=[("w0", (4, 3), 0), ("b0", (3,), 0), ("head", (3, 2), 1)], anchor_offset=0.1),
        _case("sgd_no_momentum", "SGD with momentum 0, scratch", groups=[SC(direction="sgd", momentum=0.0, weight_decay=0.5)],
              tensors=MLP),
        _case("mixed_groups", "finetune backbone + scratch head + a group with no pull, distinct rates per group",
              groups=[FT(rollback_max=3.0, rollback_min=0.2), SC(weight_decay=0.8), NO()],
              tensors=[("w0", (4, 3), 0), ("b0", (3,), 0), ("w1", (3, 3), 0), ("head_w", (3, 2), 1),
                       ("head_b", (2,), 1), ("scale", (3,), 2)], anchor_offset=0.25),
        _case("mixed_directions", "an Adam finetune group and an SGD scratch group in one optimizer",
              groups=[FT(rollback_max=2.0), SC(direction="sgd", weight_decay=0.5)],
              tensors=[("w0", (4, 3), 0), ("w1", (3, 2), 0), ("head", (2, 2), 1)], anchor_offset=0.2),
        _case("shared_layers", "layer_index groups tensors into layers (weight and bias share rho); keys not contiguous",
              groups=[FT(rollback_max=2.0)], tensors=MLP, layer_index=[3, 3, 10, 10], anchor_offset=0.3),
        _case("zero_size_and_scalar", "a 0-d tensor and a zero-size tensor beside a normal one",
              groups=[FT(rollback_max=2.0)], tensors=[("s", (), 0), ("empty", (0, 3), 0), ("w", (2, 2), 0)],
              anchor_offset=0.5),
        _case("tiny_magnitudes", "weights and gradients around 1e-15 (float32-safe: squares stay normal)",
              groups=[FT(rollback_max=2.0)], tensors=MLP, scale=1e-15, anchor_offset=1e-15),
        _case("huge_magnitudes", "weights and gradients around 1e15", groups=[SC(weight_decay=0.5)], tensors=MLP,
              scale=1e15),
        _case("varying_lr", "warm-up then cosine learning rate, mixed paradigms",
              groups=[FT(rollback_max=3.0), SC(weight_decay=0.5)],
              tensors=[("w0", (4, 3), 0), ("b0", (3,), 0), ("head", (3, 2), 1)], steps=16, lr=_warmup_cosine(1e-2, 16),
              anchor_offset=0.2),
        _case("warmup_from_zero", "linear warm-up from lr 0 to eta_0 = base_lr (the schedule's peak); the default "
              "rollback_max resolves to 0.01/eta_0, not to 0.01/lr(step 1) = 0.01/0",
              groups=[FT(), SC(weight_decay=0.5)], tensors=[("w0", (4, 3), 0), ("b0", (3,), 0), ("head", (3, 2), 1)],
              steps=10, lr=lambda t: 1e-2 * min(t - 1, 4) / 4, anchor_offset=0.2),
        _case("pull_clipped", "a schedule pushes lr*rho above 1 on steps 4-6: the coefficient is clipped to 1",
              groups=[FT(rollback_max=50.0)], tensors=[("w0", (3, 3), 0), ("w1", (3,), 0)], steps=8,
              lr=lambda t: 0.03 if 4 <= t <= 6 else 0.01, anchor_offset=0.4),
        _case("nonfinite_skip", "NaN and Inf gradients on steps 3 and 6: those steps change nothing (policy 'skip')",
              groups=[FT(rollback_max=2.0), SC(weight_decay=0.5)],
              tensors=[("w0", (3, 2), 0), ("head", (2, 2), 1)], steps=9, anchor_offset=0.2,
              nonfinite_steps={3: ("w0", float("nan")), 6: ("head", float("inf"))}, features=("nonfinite",)),
        _case("missing_grads", "a tensor without a gradient is not updated and its step count t does not advance",
              groups=[FT(rollback_max=2.0)], tensors=[("w0", (3, 2), 0), ("w1", (2,), 0)], steps=8,
              anchor_offset=0.2, missing_grads={2: ["w1"], 3: ["w1"], 5: ["w0"]}, features=("missing_grads",)),
    ]


def build(spec: dict[str, Any], dtype: str) -> Case:
    rng = np.random.Generator(np.random.PCG64(20260427 + spec["seed"]))
    tensors = [TensorSpec(n, s, g) for n, s, g in spec["tensors"]]
    groups: list[HyperParams] = spec["groups"]
    hps = [groups[t.group] for t in tensors]

    def draw(shape: tuple[int, ...], scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    initial = {t.name: draw(t.shape, spec["scale"]) for t in tensors}
    anchor = {}
    for t in tensors:
        if groups[t.group].paradigm == "finetune":
            off = spec["anchor_offset"]
            anchor[t.name] = initial[t.name] if off is None else (initial[t.name] + draw(t.shape, off)).astype(dtype)
    lr_fn = spec["lr"] or (lambda t: spec["base_lr"])
    lrs = [float(lr_fn(t)) for t in range(1, spec["steps"] + 1)]
    grads = []
    for step in range(1, spec["steps"] + 1):
        g: dict[str, np.ndarray | None] = {t.name: draw(t.shape, spec["grad_scale"]) for t in tensors}
        if step in spec["nonfinite_steps"]:
            which, bad = spec["nonfinite_steps"][step]
            arr = g[which].copy()
            arr.reshape(-1)[0] = bad
            g[which] = arr
        for name in spec["missing_grads"].get(step, []):
            g[name] = None
        grads.append(g)
    opt = ReferenceOptimizer([initial[t.name] for t in tensors], hps, base_lr=spec["base_lr"],
                             layer_index=spec["layer_index"], anchors=[anchor.get(t.name) for t in tensors],
                             nonfinite="skip")
    expected = []
    for g, lr in zip(grads, lrs):
        opt.step([g[t.name] for t in tensors], lr)
        expected.append({t.name: np.asarray(p).copy() for t, p in zip(tensors, opt.params)})
    return Case(name=spec["name"], description=spec["description"], dtype=dtype, nonfinite="skip",
                base_lr=spec["base_lr"], groups=opt_groups(groups, spec["base_lr"]), tensors=tensors,
                layer_index=spec["layer_index"], initial=initial, anchor=anchor, lr=lrs, grads=grads,
                expected=expected, rates=[float(r) for r in opt.rates], features=spec["features"])


def opt_groups(groups: list[HyperParams], base_lr: float) -> list[HyperParams]:
    """Groups as stored: rollback_max resolved, so a replayer needs no default logic."""
    from decoupled_core import resolve_rollback_max

    return [g.replace(rollback_max=resolve_rollback_max(g.rollback_max, base_lr)) if g.paradigm == "finetune" else g
            for g in groups]


def render(case: Case) -> str:
    return json.dumps(case_to_json(case), indent=1) + "\n"


def generate() -> dict[str, str]:
    """File name -> contents for every case and dtype."""
    return {f"{spec['name']}.{dtype}.json": render(build(spec, dtype)) for spec in cases() for dtype in DTYPES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the committed vectors differ from a fresh generation")
    ap.add_argument("--out", type=Path, default=VECTORS_DIR)
    args = ap.parse_args(argv)
    files = generate()
    if args.check:
        stale = [n for n, text in files.items() if not (args.out / n).exists() or (args.out / n).read_text() != text]
        extra = sorted({p.name for p in vector_files(args.out)} - set(files))
        for n in stale:
            print(f"drift: {n}")
        for n in extra:
            print(f"unexpected file: {n}")
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, text in files.items():
        (args.out / n).write_text(text)
    print(f"wrote {len(files)} vector files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

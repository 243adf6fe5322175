"""bfloat16 and float16 parameters with ``dualopt.torch.DualOpt`` (SPEC 6: float32 compute and state).

The problem of ``tests/common/lowprec_data.py`` (a small MLP, 300 steps) is trained with
the whole model in bfloat16 or float16 (weights, activations, gradients; the
loss is evaluated in float32), by DualOpt (scratch; and finetune backbone +
scratch head) on the fast and the reference path, and by ``torch.optim.AdamW``
in the same dtype. DualOpt must stay finite, keep ``exp_avg``,
``exp_avg_sq`` and ``anchor`` in float32, decrease the loss, and end within
``LOSS_TOLERANCE`` of its own float32 run and within ``VS_ADAMW`` of AdamW in
the same dtype where AdamW trains.

float16 needs no ``GradScaler`` here (the gradients stay in float16's normal
range) and cannot use one: ``GradScaler`` refuses to unscale float16
gradients. Observed: ``torch.optim.AdamW`` with float16 params produces NaN on
this problem (its float16 ``exp_avg_sq`` underflows and ``eps=1e-8`` is 0 in
float16), DualOpt does not. The usual float16 recipe, float32 params under
``torch.autocast`` with ``torch.amp.GradScaler``, is checked too: the scaler's
skipped steps never reach DualOpt (its step counts and ``skipped`` say so).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.common import lowprec_data as lp  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    # Tiny matmuls: on a loaded 2-core machine torch's thread pool makes them 30x slower.
    yield


def model(dtype: torch.dtype) -> torch.nn.Sequential:
    layers = []
    for k, (w, b) in enumerate(lp.initial_weights()):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin, torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(dtype)


def make(kind: str, m: torch.nn.Module, foreach=None):
    if kind == "adamw":
        return torch.optim.AdamW(m.parameters(), lr=lp.LR, weight_decay=lp.WEIGHT_DECAY)
    if kind == "scratch":
        return DualOpt(m.parameters(), lr=lp.LR, weight_decay=lp.WEIGHT_DECAY, foreach=foreach)
    return DualOpt.for_finetuning(m, head="4", lr=lp.LR, weight_decay=lp.WEIGHT_DECAY, foreach=foreach)


_RUNS: dict = {}


def train(kind: str, dtype: torch.dtype, foreach=None) -> dict:
    """One training run (cached: the float32 and AdamW runs serve several tests)."""
    key = (kind, dtype, foreach)
    if key not in _RUNS:
        _RUNS[key] = _train(kind, dtype, foreach)
    return _RUNS[key]


def _train(kind: str, dtype: torch.dtype, foreach=None) -> dict:
    m = model(dtype)
    opt = make(kind, m, foreach)
    x, y = lp.data()
    losses = []
    for k in range(lp.STEPS):
        xb, yb = lp.batch(k, x, y)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(m(torch.from_numpy(xb).to(dtype)).float(), torch.from_numpy(yb).long())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(m(torch.from_numpy(x).to(dtype)).float(),
                                                  torch.from_numpy(y).long()).item()
    state_dtypes = {str(v.dtype) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)}
    finite = all(math.isfinite(v) for v in losses) and all(bool(torch.isfinite(p).all()) for p in m.parameters())
    return {"first": losses[0], "final": final, "finite": finite, "state_dtypes": state_dtypes,
            "param_dtypes": {str(p.dtype) for p in m.parameters()}}


@pytest.mark.parametrize("foreach", [None, False], ids=["fast", "reference"])
@pytest.mark.parametrize("kind", ["scratch", "finetune"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_trains_like_float32(dtype, kind, foreach):
    dt = getattr(torch, dtype)
    ref = train(kind, torch.float32, foreach)
    got = train(kind, dt, foreach)
    adamw = train("adamw", dt)
    print(f"\n[lowprec torch {dtype} {kind} foreach={foreach}] final loss {got['final']:.4f} "
          f"(float32 {ref['final']:.4f}, AdamW {dtype} {adamw['final']:.4f}, initial {got['first']:.4f})")
    assert got["param_dtypes"] == {f"torch.{dtype}"}
    assert got["state_dtypes"] == {"torch.float32"}, got["state_dtypes"]  # moments and anchors (SPEC 6)
    assert got["finite"]
    assert got["final"] < 0.5 * got["first"] if kind == "scratch" else got["final"] < 0.8 * got["first"]
    assert abs(got["final"] - ref["final"]) <= lp.LOSS_TOLERANCE[dtype], (got["final"], ref["final"])
    if kind == "scratch" and adamw["finite"]:
        assert got["final"] <= adamw["final"] + lp.VS_ADAMW, (got["final"], adamw["final"])


def _amp(init_scale: float) -> dict:
    m = model(torch.float32)
    opt = DualOpt(m.parameters(), lr=lp.LR, weight_decay=lp.WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    x, y = lp.data()
    skips = 0
    for k in range(lp.STEPS):
        xb, yb = lp.batch(k, x, y)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(m(torch.from_numpy(xb)).float(), torch.from_numpy(yb).long())
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skips += scaler.get_scale() < before  # the scale only shrinks after an inf/NaN step it skipped
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(m(torch.from_numpy(x)).float(), torch.from_numpy(y).long()).item()
    steps = {int(opt.state[p]["step"]) for p in m.parameters()}
    return {"final": final, "skips": skips, "steps": steps, "dualopt_skipped": opt.skipped,
            "finite": all(bool(torch.isfinite(p).all()) for p in m.parameters())}


def test_float16_autocast_with_grad_scaler():
    ref = train("scratch", torch.float32)
    usual = _amp(2.0 ** 16)
    assert usual["finite"] and abs(usual["final"] - ref["final"]) <= lp.LOSS_TOLERANCE["float16"], usual
    # An initial scale far too large: the scaler skips steps until it has shrunk; DualOpt never sees them.
    eager = _amp(2.0 ** 40)
    assert eager["skips"] >= 5, eager
    assert eager["steps"] == {lp.STEPS - eager["skips"]} and eager["dualopt_skipped"] == 0, eager
    assert eager["finite"] and eager["final"] < 0.5 * math.log(4), eager

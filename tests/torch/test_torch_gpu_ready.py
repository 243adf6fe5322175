"""The torch step ready for GPUs (issue 21): no host read inside ``step()``, GradScaler's fused route.

On CPU the sync-free path is what CUDA takes (``Policy.sync_free_devices``); the tests
force it on CPU (``DualOpt(..., _policy=...)``) and make every host read raise while ``step()`` runs. ``DUALOPT_TORCH_DEVICE=cuda``
(``benchmarks/gpu_check.sh``) runs them on a GPU, where the path is the default.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from dualopt.torch._kernels import Policy
from dualopt.torch import DualOpt

from tests.torch._torch_helpers import assert_same_bits, fixed_data, loss_of, make_mlp, same_bits

DEVICE = torch.device(os.environ.get("DUALOPT_TORCH_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("DUALOPT_TORCH_DEVICE=cuda, but no GPU", allow_module_level=True)

# Every way a tensor's value reaches the host; each waits for the device on CUDA.
_HOST_READS = ("__bool__", "item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__")


@contextmanager
def no_host_reads() -> Iterator[None]:
    """Any read of a tensor's value by the host raises inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def refuse(name: str):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host read inside step(): Tensor.{name}")
        return method

    for name in _HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, m in saved.items():
            setattr(torch.Tensor, name, m)


#: CUDA's path on this device; large finetune tensors stay off the C kernel (which reads the host).
SYNC_FREE = Policy(sync_free_devices=(DEVICE.type,), native_min_numel=1 << 62)
#: The host route on every device, with the same kernels.
HOST = Policy(sync_free_devices=(), native_min_numel=1 << 62)


def _model(dtype: torch.dtype = torch.float64) -> torch.nn.Sequential:
    # 6 -> 256 -> 256 -> 3: the 256x256 matrix is above FOLD_MIN_NUMEL (the scratch pull folded into AdamW).
    return make_mlp(dtype=dtype, sizes=(6, 256, 256, 3)).to(DEVICE)


def _run(model: torch.nn.Module, opt: DualOpt, bad_steps: set[int], steps: int, guard: bool) -> None:
    x, y = fixed_data()
    x, y = x.to(DEVICE, next(model.parameters()).dtype), y.to(DEVICE)
    for k in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if k in bad_steps:
            next(model.parameters()).grad[0, k % 6] = float("nan") if k % 2 else float("inf")
        if guard:
            with no_host_reads():
                opt.step()
        else:
            opt.step()


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("paradigm", ["scratch", "finetune", "none"])
@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_sync_free_step_reads_nothing_back_and_matches_the_host_route(direction, paradigm, nonfinite, foreach):
    """Old code: ``bool(flag)`` in step() raises under ``no_host_reads`` (SGD: the host route only;
    ``foreach=False``: ``int(step)`` in the loop). The device-side skip must give the host route's bits:
    weights, moments, anchors and step counts untouched by a bad step (SGD: through the core's ``keep``)."""
    bad = {2, 5} if nonfinite == "skip" else set()
    kw = dict(lr=1e-2, direction=direction, paradigm=paradigm, nonfinite=nonfinite, weight_decay=0.5,
              foreach=foreach)
    a = _model()
    opt_a = DualOpt(a.parameters(), _policy=SYNC_FREE, **kw)
    _run(a, opt_a, bad, 8, guard=True)
    b = _model()
    opt_b = DualOpt(b.parameters(), _policy=HOST, **kw)
    _run(b, opt_b, bad, 8, guard=False)
    # foreach=False: the device computes the bias corrections from a float64 step tensor, the host
    # route in Python floats; torch's pow and Python's differ by an ulp, which 8 steps carry to ~1e-15.
    same = assert_same_bits if foreach is None else (
        lambda x, y, what: torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14))
    for p, q in zip(a.parameters(), b.parameters()):
        same(p, q, "param")
        for k in opt_b.state[q]:
            same(opt_a.state[p][k], opt_b.state[q][k], k)
        assert int(opt_a.state[p]["step"]) == 8 - len(bad)
    assert opt_a.skipped == opt_b.skipped == len(bad)
    assert opt_a.state_dict()["param_groups"][0]["skipped"] == len(bad)


@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_a_skipped_step_changes_nothing_on_the_device_path(direction):
    """Spec section 8, bitwise, on the sync-free path: bf16 weights, finetune and scratch groups."""
    model = _model(torch.bfloat16)
    params = list(model.parameters())
    opt = DualOpt([{"params": params[:4], "paradigm": "finetune"}, {"params": params[4:]}], lr=1e-2,
                  direction=direction, _policy=SYNC_FREE)
    _run(model, opt, set(), 2, guard=True)
    _run(model, opt, {1}, 2, guard=True)  # one good step, one bad
    _run(model, opt, {0}, 1, guard=True)  # bad
    assert opt.skipped == 2
    # The same three good steps without the bad ones: every bit the same.
    model2 = _model(torch.bfloat16)
    params2 = list(model2.parameters())
    opt2 = DualOpt([{"params": params2[:4], "paradigm": "finetune"}, {"params": params2[4:]}], lr=1e-2,
                   direction=direction, _policy=SYNC_FREE)
    _run(model2, opt2, set(), 2, guard=True)
    _run(model2, opt2, set(), 1, guard=True)
    for p, q in zip(params, params2):
        assert_same_bits(p, q, "param")
        for k in opt2.state[q]:
            assert_same_bits(opt.state[p][k], opt2.state[q][k], k)


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = torch._amp_foreach_non_finite_check_and_unscale_

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", counting)
    return calls


@pytest.mark.parametrize("route", ["host", "device"])
@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_grad_scaler_fused_route_equals_the_eager_route(monkeypatch, route, direction):
    """GradScaler hands ``found_inf``/``grad_scale`` to step() (one check, unscale in the kernel) and gives
    the bits of its eager route (unscale_, then step), inf steps included. Old code: two checks per step."""
    policy = SYNC_FREE if route == "device" else Policy()
    x, y = (t.to(DEVICE) for t in fixed_data())
    results = []
    for fused in (True, False):
        model = _model()
        params = list(model.parameters())
        opt = DualOpt([{"params": params[:4], "paradigm": "finetune"}, {"params": params[4:]}], lr=1e-2,
                      direction=direction, _policy=policy)
        if not fused:
            opt._step_supports_amp_scaling = False  # GradScaler's eager route: unscale_, check, then step()
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0 ** 10)
        calls = _count_checks(monkeypatch)
        for k in range(8):
            opt.zero_grad()
            scaler.scale(loss_of(model, x, y)).backward()
            if k in (3, 4):
                params[k].grad.view(-1)[0] = float("inf")
            calls[0] = 0
            scaler.step(opt)
            if fused:
                assert calls[0] == 1  # the scaler's check only (per device and dtype)
            scaler.update()
        results.append((model, opt, scaler.get_scale()))
    (a, opt_a, scale_a), (b, opt_b, scale_b) = results
    assert scale_a == scale_b == 2.0 ** 10 * 0.25  # two backoffs
    assert opt_a.skipped == opt_b.skipped == 0  # GradScaler's skips are its own
    for p, q in zip(a.parameters(), b.parameters()):
        assert_same_bits(p, q, "param")
        for k in opt_b.state[q]:
            assert_same_bits(opt_a.state[p][k], opt_b.state[q][k], k)
        assert int(opt_a.state[p]["step"]) == 6


def _bad_grads(model: torch.nn.Module, k: int) -> None:
    if k in (2, 5):
        next(model.parameters()).grad[0, 0] = float("nan")


@pytest.mark.parametrize("direction", ["adam", "sgd"])
def test_compiled_step_has_no_graph_break_and_follows_the_core(direction):
    """``torch.compile(opt.step, fullgraph=True)`` traces the whole step (old code: the step was
    ``@torch.compiler.disable``, which fullgraph refuses), skips NaN steps on the device and follows
    the reference loop (the core's rule, ``foreach=False``) to float64 rounding."""
    torch._dynamo.reset()
    x, y = (t.to(DEVICE) for t in fixed_data())
    models = [_model(), _model()]
    opts = []
    for m in models:
        params = list(m.parameters())
        opts.append(DualOpt([{"params": params[:4], "paradigm": "finetune"}, {"params": params[4:]}], lr=1e-2,
                            direction=direction, weight_decay=0.5, foreach=None if not opts else False))
    compiled = torch.compile(opts[0].step, fullgraph=True, backend="aot_eager")
    for k in range(8):
        for m, o in zip(models, opts):
            o.zero_grad()
            loss_of(m, x, y).backward()
            _bad_grads(m, k)
        compiled()
        opts[1].step()
    assert opts[0].skipped == opts[1].skipped == 2
    for p, q in zip(*(m.parameters() for m in models)):
        assert int(opts[0].state[p]["step"]) == int(opts[1].state[q]["step"]) == 6
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        for key in opts[1].state[q]:
            torch.testing.assert_close(opts[0].state[p][key], opts[1].state[q][key], rtol=1e-13, atol=1e-15)


def test_inductor_compiled_check_skips_nan_and_inf_and_applies_finite_steps():
    """Under Inductor the non-finite check is ``sum(g - g)`` (read-only); a simplification of ``g - g`` to 0
    would apply NaN steps. NaN, +Inf and -Inf in either tensor are skipped, bit for bit; finite steps,
    huge ones included (their sum overflows float32), are applied."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=gen, dtype=torch.float32).to(DEVICE)),
              torch.nn.Parameter(torch.randn(64, generator=gen, dtype=torch.float32).to(DEVICE))]
    opt = DualOpt([{"params": params, "paradigm": "finetune"}], lr=1e-3)
    step = torch.compile(opt.step, fullgraph=True)
    plan = [None, float("nan"), float("inf"), float("-inf"), "huge", float("nan")]
    for k, bad in enumerate(plan):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(DEVICE)
        if bad == "huge":
            params[0].grad.fill_(3e38)
        elif bad is not None:
            params[k % 2].grad.view(-1)[5] = bad
        before = [p.detach().clone() for p in params]
        step()
        changed = [not same_bits(a, p) for a, p in zip(before, params)]
        if bad is None or bad == "huge":
            assert all(changed), (k, bad)
        else:
            assert not any(changed), (k, bad)
    assert opt.skipped == 4
    assert int(opt.state[params[0]]["step"]) == 2

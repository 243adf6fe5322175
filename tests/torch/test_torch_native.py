"""The C kernel of ``dualopt.torch._native``: the spec's arithmetic, bit for bit, and safe fallbacks.

The kernel evaluates ``decoupled_core.rule.adam_pre_weight`` and ``pull``
operation for operation without FMA contraction, so it must equal the core
evaluated with numpy exactly (torch's own ``sqrt`` on CPU is not always
correctly rounded, so the torch reference loop agrees only to the fast path's
tolerance; test_torch_fastpath.py covers that). Sizes straddle the kernel's
thread slices (64K elements per thread at least) and the tensor boundaries
inside one call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dualopt.torch._kernels as kernels  # noqa: E402
from dualopt.conformance.tolerances import fast_path_tolerance  # noqa: E402
import dualopt.torch._native as native  # noqa: E402
from decoupled_core import AdamState, HyperParams, adam_coefficients, pull_coefficient, step_tensor  # noqa: E402
from dualopt.torch import DualOpt  # noqa: E402

from tests.torch._torch_helpers import assert_same_bits  # noqa: E402

HAVE_CC = shutil.which(os.environ.get("CC", "cc")) is not None
SIZES = [1, 70_001, 3, 200_000, 65_536]  # with 2+ threads a slice ends inside the second tensor
needs_native = pytest.mark.skipif(native.library() is None, reason=f"C kernels: {native.native_status()['reason']}")


@pytest.mark.skipif(not HAVE_CC or os.environ.get("DUALOPT_NATIVE") == "0", reason="no C compiler here")
def test_the_kernels_build_where_there_is_a_compiler():
    status = native.native_status()
    assert status["enabled"], status["reason"]


def _tensors(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda scale=1.0: [torch.randn(n, generator=gen, dtype=torch.float64).mul(scale).to(dtype)  # noqa: E731
                              for n in SIZES]
    return make(), make(0.1), make(0.1), [t.abs() for t in make(0.01)], make()  # p, g, m, v, a


def _core(p, g, m, v, a, *, paradigm, lr, rate, step, maximize):
    """The core on numpy, one tensor at a time: what the kernel must reproduce."""
    hp = HyperParams(paradigm=paradigm)
    out = []
    for pi, gi, mi, vi, ai in zip(p, g, m, v, a):
        grad = -gi.numpy() if maximize else gi.numpy()
        new_p, st = step_tensor(pi.numpy(), grad, AdamState(mi.numpy().copy(), vi.numpy().copy()),
                                ai.numpy(), hp=hp, lr=lr, step=step, rate=rate)
        out.append((new_p, st.exp_avg, st.exp_avg_sq))
    return out


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("paradigm, rate, maximize", [("finetune", 7.0, False), ("finetune", 0.0, False),
                                                      ("scratch", 3.0, True), ("finetune", 1e3, True)])
def test_kernel_equals_the_numpy_core_bitwise(dtype, paradigm, rate, maximize, threads):
    torch.set_num_threads(threads)  # the autouse fixture restores it
    p, g, m, v, a = _tensors(dtype, seed=3)
    lr, step = 1e-3, 4
    want = _core(p, g, m, v, a, paradigm=paradigm, lr=lr, rate=rate, step=step, maximize=maximize)
    k = adam_coefficients(lr, 0.9, 0.999, step)
    c = pull_coefficient(lr, rate)
    native.adam_pull(p, g, m, v, a if paradigm == "finetune" else None, [c] * len(p), beta1=0.9, beta2=0.999,
                     eps=1e-8, step_size=k.step_size, inv_sqrt_bc2=k.inv_sqrt_bc2, maximize=maximize)
    for i, (pi, mi, vi) in enumerate(zip(p, m, v)):
        for name, got, exp in (("param", pi, want[i][0]), ("exp_avg", mi, want[i][1]), ("exp_avg_sq", vi, want[i][2])):
            assert np.array_equal(got.numpy(), exp), f"tensor {i} {name}: max |diff| {np.abs(got.numpy() - exp).max()}"


@needs_native
def test_zero_coefficient_leaves_the_pre_weight_alone():
    """c = 0 skips the pull (spec 4.2): an infinite pre-weight stays infinite (c * (pre - a) would be NaN)."""
    p, g, m, v, a = ([torch.tensor([x], dtype=torch.float32)] for x in (float("inf"), 1.0, 0.0, 0.0, 0.0))
    native.adam_pull(p, g, m, v, a, [0.0], beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, inv_sqrt_bc2=1.0,
                     maximize=False)
    assert p[0].item() == float("inf")


def _finetune_run(params, steps, *, swap_data=False):
    opt = DualOpt(params, lr=0.02, paradigm="finetune", rollback_max=2.0)
    for k in range(steps):
        gen = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1
        if swap_data and k == 2:
            for p in params:  # new storage, same values: the kernel must not keep old pointers
                p.data = p.data.clone()
        opt.step()
    return opt


@needs_native
def test_optimizer_takes_the_kernel_and_matches_the_numpy_core():
    """A finetune group with large tensors: the plan gives them to the C kernel, and 6 steps equal the core."""
    big = (kernels.DEFAULT_POLICY.fold_min_numel // 64 + 3, 64)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i, s in
            enumerate([big, big, (5,)])]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = _finetune_run(params, 6)
    (plan,) = opt._plans.values()
    (bucket,) = plan.buckets
    assert bucket.native == [0, 1] and bucket.rest == [2]
    hp = HyperParams(paradigm="finetune", rollback_max=2.0)
    rates = [opt._rates(0, hp)[i] for i in range(3)]
    for i in (0, 1):  # the small tensor goes through torch's fused kernel: tolerance, tested elsewhere
        theta, st = init[i].numpy().copy(), AdamState(np.zeros(big), np.zeros(big))
        for k in range(6):
            gen = torch.Generator().manual_seed(100 + k)
            grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1 for p in params]
            theta, st = step_tensor(theta, grads[i].numpy(), st, init[i].numpy(), hp=hp, lr=0.02, step=k + 1,
                                    rate=rates[i])
        assert np.array_equal(params[i].detach().numpy(), theta), f"tensor {i}"


@needs_native
def test_swapped_parameter_storage_is_followed():
    big = (kernels.DEFAULT_POLICY.fold_min_numel + 5,)
    init = torch.randn(big, generator=torch.Generator().manual_seed(0))
    plain, swapped = [torch.nn.Parameter(init.clone())], [torch.nn.Parameter(init.clone())]
    _finetune_run(plain, 5)
    _finetune_run(swapped, 5, swap_data=True)
    assert_same_bits(swapped[0], plain[0], "after p.data was replaced")


@needs_native
def test_without_the_kernel_the_optimizer_gives_the_same_weights_to_tolerance(monkeypatch):
    big = (kernels.DEFAULT_POLICY.fold_min_numel + 5,)
    init = torch.randn(big, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with_c = [torch.nn.Parameter(init.clone())]
    _finetune_run(with_c, 8)
    monkeypatch.setitem(native._state, "lib", None)
    without = [torch.nn.Parameter(init.clone())]
    opt = _finetune_run(without, 8)
    assert opt._plans[0].buckets[0].native == []
    tol = fast_path_tolerance(torch.float64, 8)
    torch.testing.assert_close(without[0], with_c[0], rtol=tol, atol=tol)
    assert not torch.equal(without[0], init)


def test_disabled_by_environment_in_a_fresh_process(tmp_path):
    code = ("import dualopt.torch._native as n, torch; s = n.native_status(); "
            "from dualopt.torch import DualOpt; p = torch.nn.Parameter(torch.ones(40000)); "
            "o = DualOpt([p], lr=0.1, paradigm='finetune'); p.grad = torch.ones(40000); o.step(); "
            "print(s['enabled'], s['reason'], float(p[0]))")
    env = dict(os.environ, DUALOPT_NATIVE="0", DUALOPT_NATIVE_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    enabled, *reason, value = out.split()
    assert enabled == "False" and "DUALOPT_NATIVE=0" in " ".join(reason)
    assert float(value) < 1.0 and not any(tmp_path.iterdir())


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler here")
def test_a_broken_compiler_falls_back(tmp_path):
    code = "import dualopt.torch._native as n; s = n.native_status(); print(s['enabled']); print(s['reason'])"
    env = dict(os.environ, CC="false", DUALOPT_NATIVE_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "False" and "failed" in out


@pytest.mark.skipif(not HAVE_CC or os.environ.get("DUALOPT_NATIVE") == "0", reason="no C compiler here")
def test_an_unusable_home_cache_falls_back_to_a_private_temporary_directory(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")  # $XDG_CACHE_HOME below a file: no directory can be made there, even by root
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DUALOPT_NATIVE_CACHE"}
    env.update(XDG_CACHE_HOME=str(blocker / "cache"), TMPDIR=str(tmp_path / "tmp"))
    code = "import dualopt.torch._native as n; print(n.native_status()['reason'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    private = tmp_path / "tmp" / f"dualopt-{os.getuid()}"
    assert f"loaded from {private}" in out
    assert private.stat().st_mode & 0o777 == 0o700


def test_a_temporary_directory_another_user_could_write_is_not_used(tmp_path):
    (tmp_path / "tmp").mkdir()
    private = tmp_path / "tmp" / f"dualopt-{os.getuid()}"
    private.mkdir(mode=0o777)
    private.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k != "DUALOPT_NATIVE_CACHE"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "file" / "cache"), TMPDIR=str(tmp_path / "tmp"), CC="cc")
    (tmp_path / "file").write_text("")
    code = "import dualopt.torch._native as n; s = n.native_status(); print(s['enabled'], s['reason'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and f"{private} is writable by group or others" in out
    assert not any(private.iterdir())

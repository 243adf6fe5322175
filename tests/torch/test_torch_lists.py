"""The core evaluated on lists of tensors (``dualopt._shared.torch_lists``) against the core tensor by tensor.

Every comparison is bit for bit: the list namespace must perform the core's
operations in the core's order. Adam is compared with the core on torch per
tensor (torch.sqrt on CPU is not numpy's, see FIELD_NOTES); SGD and the pull
also with the core on numpy. Then torch's one finiteness check against the
core's ``all_finite``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import array_api_compat.torch as torch_xp  # noqa: E402

from decoupled_core import AdamState, SGDState, adam_pre_weight, all_finite, pull, pull_coefficient, sgd_pre_weight  # noqa: E402
from dualopt._shared.torch_lists import (TORCH_LISTS, SUM_CHECK_MIN_NUMEL, PerTensor, TensorList, grads_finite,  # noqa: E402
                                         nonfinite_flag)

SHAPES = [(3, 5), (7,), (), (0,), (2, 3, 4)]
DTYPES = [torch.float32, torch.float64]


def _tensors(dtype, seed, scale=1.0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in SHAPES]
    return [(t.abs() if positive else t).to(dtype) for t in out]


def _bytes(x):
    return x.flatten().clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        y = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(_bytes(x), _bytes(y))


ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3 / (1 - 0.9**3), inv_sqrt_bc2=1 / (1 - 0.999**3) ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep", [None, True, False])
def test_adam_pre_weight_on_lists_is_the_core_per_tensor(dtype, keep):
    p, g = _tensors(dtype, 0), _tensors(dtype, 1, 0.1)
    m, v = _tensors(dtype, 2, 0.01), _tensors(dtype, 3, 1e-4, positive=True)
    k = None if keep is None else torch.tensor(keep)
    pre, st = adam_pre_weight(TensorList(p), TensorList(g), AdamState(TensorList(m), TensorList(v)), xp=TORCH_LISTS,
                              keep=k, **ADAM)
    singles = [adam_pre_weight(*args, xp=torch_xp, keep=k, **ADAM)
               for args in zip(p, g, (AdamState(a, b) for a, b in zip(m, v)))]
    if keep is not False:  # a skipped step's pre-weight is meaningless
        _same(pre.tensors, [s[0] for s in singles])
    _same(st.exp_avg.tensors, [s[1].exp_avg for s in singles])
    _same(st.exp_avg_sq.tensors, [s[1].exp_avg_sq for s in singles])
    if keep is False:
        _same(st.exp_avg.tensors, m)
        _same(st.exp_avg_sq.tensors, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("keep", [None, True, False])
def test_sgd_pre_weight_on_lists_is_the_core_per_tensor_on_torch_and_numpy(dtype, nesterov, keep):
    p, g, b = _tensors(dtype, 4), _tensors(dtype, 5, 0.1), _tensors(dtype, 6, 0.1)
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov)
    k = None if keep is None else torch.tensor(keep)
    pre, st = sgd_pre_weight(TensorList(p), TensorList(g), SGDState(TensorList(b)), xp=TORCH_LISTS, keep=k, **kw)
    on_torch = [sgd_pre_weight(x, y, SGDState(z), xp=torch_xp, keep=k, **kw) for x, y, z in zip(p, g, b)]
    nk = None if keep is None else np.asarray(keep)
    on_numpy = [sgd_pre_weight(x.numpy(), y.numpy(), SGDState(z.numpy()), xp=np, keep=nk, **kw)
                for x, y, z in zip(p, g, b)]
    _same(st.momentum_buffer.tensors, [s[1].momentum_buffer for s in on_torch])
    _same(st.momentum_buffer.tensors, [s[1].momentum_buffer for s in on_numpy])
    if keep is not False:
        _same(pre.tensors, [s[0] for s in on_torch])
        _same(pre.tensors, [s[0] for s in on_numpy])
    else:
        _same(st.momentum_buffer.tensors, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("finetune", [False, True])
def test_pull_with_per_tensor_coefficients_is_the_core_per_tensor(dtype, finetune):
    pre, a = _tensors(dtype, 7), _tensors(dtype, 8)
    rates = [0.0, 0.3, 1.7, 2.0, 1e-3]
    lr = 0.37
    cs = [pull_coefficient(lr, r) for r in rates]  # host float64, rounded once to dtype below
    coefficient = PerTensor(torch.tensor(cs, dtype=torch.float64).to(dtype).unbind())
    anchor = TensorList(a) if finetune else None
    got = pull(TensorList(pre), anchor, coefficient, xp=TORCH_LISTS)
    assert type(got) is TensorList and [t.shape for t in got.tensors] == [t.shape for t in pre]
    expected = [pull(x.numpy(), y.numpy() if finetune else None, c, xp=np) for x, y, c in zip(pre, a, cs)]
    _same(got.tensors, expected)
    # one host coefficient for every tensor
    got = pull(TensorList(pre), anchor, 0.25, xp=TORCH_LISTS)
    _same(got.tensors, [pull(x, y if finetune else None, 0.25, xp=torch_xp) for x, y in zip(pre, a)])


def test_pull_coefficient_on_a_list_of_rates_clips_like_the_host():
    lr = torch.tensor(0.37, dtype=torch.float64)
    rates = [0.5, 1.7, 3.0, 0.0]
    got = pull_coefficient(lr, TensorList([torch.tensor(r, dtype=torch.float64) for r in rates]), xp=TORCH_LISTS)
    assert [float(c) for c in got.tensors] == [pull_coefficient(0.37, r) for r in rates]


def test_traced_coefficients_are_0d_tensors():
    p = _tensors(torch.float32, 9)
    c = torch.tensor(0.125, dtype=torch.float64)  # a traced coefficient: cast to the working dtype by the core
    got = pull(TensorList(p), None, c, xp=TORCH_LISTS)
    _same(got.tensors, [pull(x, None, c, xp=torch_xp) for x in p])
    minus = TensorList(p) - torch.tensor(0.5)
    _same(minus.tensors, [x - 0.5 for x in p])
    _same((1.0 - TensorList(p)).tensors, [1.0 - x for x in p])


def test_operands_that_do_not_fit_are_refused():
    x = TensorList([torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match="different lengths"):
        x + TensorList([torch.ones(2)])
    with pytest.raises(ValueError, match="0-d"):
        x * torch.ones(2)
    with pytest.raises(TypeError, match="not str"):
        x * "a"


def _grads_with(value, at, dtype_large=torch.bfloat16):
    small = [torch.zeros(3), torch.zeros(4, dtype=torch.float64), torch.zeros(4, 6).t()]  # the last: a strided view
    large = [torch.zeros(SUM_CHECK_MIN_NUMEL + 1), torch.zeros(SUM_CHECK_MIN_NUMEL, dtype=dtype_large)]
    grads = [g.clone() if g.is_contiguous() else g.t().clone().t() for g in small + large]
    if at is not None:
        grads[at][(-1,) * grads[at].dim()] = value
    return grads


@pytest.mark.parametrize("at", [None, 0, 1, 2, 3, 4])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_one_finiteness_check_agrees_with_the_core(at, value):
    grads = _grads_with(value, at)
    expected = bool(all_finite([g.float().numpy() for g in grads], xp=np))
    assert expected is (at is None)
    assert grads_finite(grads) is expected
    flag = nonfinite_flag(grads, torch.device("cpu"))
    assert flag.dtype == torch.float32 and flag.shape == () and float(flag) == (0.0 if expected else 1.0)
    for g, clean in zip(grads, _grads_with(value, at)):  # the check leaves every value in place (a NaN stays a NaN)
        torch.testing.assert_close(g, clean, rtol=0, atol=0, equal_nan=True)


def test_an_overflowing_sum_of_finite_values_is_finite():
    huge = [torch.full((SUM_CHECK_MIN_NUMEL,), 3e38)]
    assert grads_finite(huge) is True
    assert float(nonfinite_flag(huge, torch.device("cpu"))) == 0.0


def test_unnamed_results_are_reused_in_place_and_named_ones_never(monkeypatch):
    """A temporary of the list's own operations is updated in place (no allocation); a named one, or the
    caller's tensors, never: the core's SGD with Nesterov reads its buffer twice."""
    from dualopt._shared import torch_lists

    if torch_lists._TEMPORARY == 0:
        pytest.skip("this interpreter does not tell temporaries by their reference count: no reuse")
    x = TensorList(_tensors(torch.float64, 10))
    before = [t.clone() for t in x.tensors]
    t = x * 2.0  # a new list: x is the caller's
    ptrs = [a.data_ptr() for a in t.tensors]
    calls = []
    for name in ("_foreach_mul", "_foreach_mul_", "_foreach_add", "_foreach_add_"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    y = (x * 2.0) * 3.0 + 1.0  # the temporary of x * 2.0 is reused twice
    assert calls == ["_foreach_mul", "_foreach_mul_", "_foreach_add_"]
    monkeypatch.undo()
    named = t * 3.0  # t is named: a new list, t unchanged
    assert [a.data_ptr() for a in named.tensors] != ptrs
    _same(t.tensors, [b * 2.0 for b in before])
    _same(x.tensors, before)
    _same(y.tensors, [(b * 2.0) * 3.0 + 1.0 for b in before])
    z = x - (x * 0.5)  # the right operand is reused: (-o) + x, the same bits as x - o
    _same(z.tensors, [b - b * 0.5 for b in before])


def test_a_list_whose_memory_was_reused_cannot_be_read():
    x = TensorList([torch.ones(3)])
    t = x * 2.0
    # What a wrong reuse would leave behind: reading the consumed list raises instead of giving changed values.
    t._reused(torch._foreach_mul_, (2.0,))
    with pytest.raises(RuntimeError, match="reused"):
        t.tensors


def _ptrs(xs):
    return [t.data_ptr() for t in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["adam", "sgd", "sgd-nesterov"])
def test_donated_state_takes_the_core_results_in_place(dtype, direction):
    """Donated weights and state: the core's bits per tensor, computed in the donated memory (what the
    callers' copy-back then leaves out), and the donated lists cannot be read afterwards."""
    p, g = _tensors(dtype, 11), _tensors(dtype, 12, 0.1)
    s = [_tensors(dtype, 13, 0.01), _tensors(dtype, 14, 1e-4, positive=True)][: 2 if direction == "adam" else 1]
    given_p, given_s = [t.clone() for t in p], [[t.clone() for t in x] for x in s]
    ptrs_p, ptrs_s = _ptrs(given_p), [_ptrs(x) for x in given_s]
    theta, state = TensorList(given_p, donate=True), [TensorList(x, donate=True) for x in given_s]
    if direction == "adam":
        pre, st = adam_pre_weight(theta, TensorList(g), AdamState(*state), xp=TORCH_LISTS, **ADAM)
        singles = [adam_pre_weight(x, y, AdamState(a, b), xp=torch_xp, **ADAM) for x, y, a, b in zip(p, g, *s)]
    else:
        kw = dict(lr=0.05, momentum=0.9, nesterov=direction == "sgd-nesterov")
        pre, st = sgd_pre_weight(theta, TensorList(g), SGDState(*state), xp=TORCH_LISTS, **kw)
        singles = [sgd_pre_weight(x, y, SGDState(b), xp=torch_xp, **kw) for x, y, b in zip(p, g, *s)]
    _same(pre.tensors, [x[0] for x in singles])
    for k, got in enumerate(st):
        _same(got.tensors, [x[1][k] for x in singles])
        assert got.tensors == given_s[k] and _ptrs(got.tensors) == ptrs_s[k]  # the very tensors: no copy-back
    assert _ptrs(pre.tensors) == ptrs_p
    for spent in (theta, *state):
        with pytest.raises(RuntimeError, match="reused"):
            spent.tensors
    _same(g, _tensors(dtype, 12, 0.1))  # never the gradient's memory


def test_a_donated_list_is_spent_by_its_first_operation_whatever_it_is():
    """Read twice, a donated list raises instead of giving the changed values: a device-side skip (the
    core's select reads the old state again) must not donate."""
    x = TensorList([torch.ones(3)], donate=True)
    assert len(x) == 1 and x.dtype == torch.float32  # not operations
    y = TensorList([torch.full((3,), 2.0)]) / x  # the right operand of a division is not written, but spent
    with pytest.raises(RuntimeError, match="reused"):
        x * 2.0
    _same(y.tensors, [torch.full((3,), 2.0)])
    b = [torch.ones(3)]
    with pytest.raises(RuntimeError, match="reused"):
        sgd_pre_weight(TensorList([torch.ones(3)]), TensorList([torch.ones(3)]), SGDState(TensorList(b, donate=True)),
                       lr=0.1, momentum=0.9, nesterov=False, xp=TORCH_LISTS, keep=torch.tensor(True))


@pytest.mark.parametrize("flag", [None, 0.0, 1.0])
def test_the_list_path_donates_only_without_a_device_side_skip(monkeypatch, flag):
    """``_core_on_lists``: without ``found_inf`` the buffers and weights are updated in their own memory
    and not copied onto themselves; with it, the old path (new lists, a select, a copy-back) keeps every
    bit of a skipped step."""
    from types import SimpleNamespace

    from dualopt._shared import torch_lists
    from dualopt.torch import _kernels

    p, g, b = _tensors(torch.float32, 15), _tensors(torch.float32, 16, 0.1), _tensors(torch.float32, 17, 0.1)
    work, bufs = [t.clone() for t in p], [t.clone() for t in b]
    bucket = SimpleNamespace(slots=(bufs,), pulled=[], anchors=None, pull_scalars=[])
    hp = SimpleNamespace(momentum=0.9, nesterov=True)
    copies = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: copies.append(len(dst)) or real(dst, src))
    donated = []
    real_init = torch_lists.TensorList.__init__

    def init(self, tensors, *, donate=False, _owned=False):
        donated.append(donate)
        real_init(self, tensors, donate=donate, _owned=_owned)

    monkeypatch.setattr(torch_lists.TensorList, "__init__", init)
    found_inf = None if flag is None else torch.tensor(flag)
    _kernels._core_on_lists(bucket, work, g, hp=hp, lr=0.05, maximize=False, found_inf=found_inf)
    monkeypatch.undo()
    expected = [sgd_pre_weight(x, y, SGDState(z), lr=0.05, momentum=0.9, nesterov=True, xp=torch_xp)
                for x, y, z in zip(p, g, b)]
    if flag is None:
        assert any(donated) and copies == []
    else:
        assert not any(donated) and copies == [len(p), len(p)]
    if flag == 1.0:
        _same(work, p)
        _same(bufs, b)
    else:
        _same(work, [e[0] for e in expected])
        _same(bufs, [e[1].momentum_buffer for e in expected])

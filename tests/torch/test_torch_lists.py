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
from dualopt._shared.torch_lists import (TORCH_LISTS, SUM_CHECK_MIN_NUMEL, TensorList, grads_finite,  # noqa: E402
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
    coefficient = TensorList(torch.tensor(cs, dtype=torch.float64).to(dtype).unbind())
    anchor = TensorList(a) if finetune else None
    got = pull(TensorList(pre), anchor, coefficient, xp=TORCH_LISTS)
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

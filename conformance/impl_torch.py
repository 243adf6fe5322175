"""PyTorch implementations for the conformance suite.

- ``torch DualOpt (reference loop)``: :class:`dualopt.torch.DualOpt` with
  ``foreach=False``, the per-tensor loop over :func:`decoupled_core.step_tensor`.
- ``torch DualOpt (fast path)``: the same optimizer with ``foreach=True``
  (fused Adam kernel + multi-tensor pull; SGD: the core on lists of tensors).
- ``torch DualOpt (C kernel)``: the fast path with every Adam finetune tensor
  given to the C kernel of :mod:`dualopt.torch._native` (the default policy gives
  it only tensors of ``Policy.native_min_numel`` elements and more; the vectors
  are small, so this row passes ``Policy(native_min_numel=0)``). Skipped where
  the kernel does not build.
- ``torch.optim.Adam``: torch's own Adam, closed loop in mode ``"none"`` only
  (the degenerate comparison).

Open loop: one :class:`torch.nn.Parameter` per case tensor, one param group per
case group (hyperparameters under torch's names), ``layer_index`` and ``anchor``
passed explicitly by name; the learning rate of step k is written into every
group's ``"lr"`` before ``step()``, as a scheduler would. Closed loop: the
problem's MLP as ``nn.Linear`` layers (``weight`` = kernel transposed) in an
ordinary ``loss.backward(); optimizer.step()`` loop, float64.

Examples
--------
>>> from dualopt.spec.vectors import load_case
>>> from dualopt.spec import VECTORS_DIR
>>> impl = TorchDualOpt(foreach=False)
>>> case = load_case(VECTORS_DIR / "mixed_groups.float64.json")
>>> traj = impl.replay_cases([case])["mixed_groups.float64"]
>>> bool((traj[-1]["head_w"] == case.expected[-1]["head_w"]).all())
True
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Sequence

import numpy as np

from decoupled_core import HyperParams
from dualopt.spec.vectors import Case

from .problem import EPS, LAYER_INDEX, NAMES, Problem, group_hyperparams
from .protocol import Implementation, Trajectory, c_kernel_unavailable, case_id

__all__ = ["TorchDualOpt", "TorchNative", "TorchAdam", "implementations", "torch_group", "replay_case", "train_closed_loop"]

# problem tensor name -> nn.Sequential parameter name (Linear layers at positions 0, 2, 4)
_TORCH_NAME = {f"dense_{i}/{leaf}": f"{2 * i}.{'weight' if leaf == 'kernel' else 'bias'}"
               for i in range(3) for leaf in ("kernel", "bias")}


def _missing() -> str | None:
    return None if importlib.util.find_spec("torch") is not None else "torch not installed"


def torch_group(hp: HyperParams) -> dict[str, Any]:
    """A :class:`HyperParams` under :class:`dualopt.torch.DualOpt`'s argument names (a param-group dict).

    Examples
    --------
    >>> g = torch_group(HyperParams(paradigm="finetune", beta2=0.99))
    >>> g["betas"], g["paradigm"]
    ((0.9, 0.99), 'finetune')
    """
    return {"direction": hp.direction, "betas": (hp.beta1, hp.beta2), "eps": hp.eps, "momentum": hp.momentum,
            "nesterov": hp.nesterov, "paradigm": hp.paradigm, "weight_decay": hp.weight_decay,
            "rollback_max": hp.rollback_max, "rollback_min": hp.rollback_min, "rollback_power": hp.rollback_power}


def replay_case(case: Case, *, foreach: bool, policy: Any = None) -> Trajectory:
    """Replay one vector case with ``DualOpt``; parameters after every step (numpy, case dtype).

    ``policy``: a ``dualopt.torch._kernels.Policy`` for the fast path (None: the default).
    """
    import torch

    from dualopt.torch import DualOpt

    names = case.names
    params = {n: torch.nn.Parameter(torch.from_numpy(case.initial[n].copy())) for n in names}
    groups = []
    for gi, hp in enumerate(case.groups):
        members = [t.name for t in case.tensors if t.group == gi]
        if members:
            groups.append({"params": [(n, params[n]) for n in members], "lr": case.base_lr, **torch_group(hp)})
    keys = case.layer_index if case.layer_index is not None else list(range(len(names)))
    opt = DualOpt(groups, lr=case.base_lr, layer_index=dict(zip(names, keys)),
                  anchor={n: torch.from_numpy(a.copy()) for n, a in case.anchor.items()},
                  nonfinite=case.nonfinite, foreach=foreach, _policy=policy)
    out: Trajectory = []
    for lr, grads in zip(case.lr, case.grads):
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in params.items():
            g = grads.get(n)
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()
        out.append({n: p.detach().numpy().copy() for n, p in params.items()})
    return out


def _mlp(problem: Problem) -> Any:
    import torch

    sizes = [problem.weights[f"dense_{i}/kernel"].shape for i in range(3)]
    layers: list[Any] = []
    for i, (fan_in, fan_out) in enumerate(sizes):
        layers.append(torch.nn.Linear(fan_in, fan_out, dtype=torch.float64))
        if i < 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for name, tname in _TORCH_NAME.items():
            w = problem.weights[name]
            model.get_parameter(tname).copy_(torch.from_numpy(w.T.copy() if w.ndim == 2 else w.copy()))
    return model


def _problem_weights(model: Any) -> dict[str, np.ndarray]:
    out = {}
    for name, tname in _TORCH_NAME.items():
        w = model.get_parameter(tname).detach().numpy()
        out[name] = (w.T if w.ndim == 2 else w).copy()
    return out


def train_closed_loop(problem: Problem, make_optimizer: Callable[[Any, str], Any], mode: str) -> Trajectory:
    """Train the problem's MLP in the ordinary torch loop (float64); weights after every epoch, problem layout."""
    import torch

    model = _mlp(problem)
    opt = make_optimizer(model, mode)
    out: Trajectory = []
    for _ in range(problem.epochs):
        for x, y in problem.batches():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            opt.step()
        out.append(_problem_weights(model))
    return out


def _dualopt_for(problem: Problem, foreach: bool, policy: Any = None) -> Callable[[Any, str], Any]:
    def make(model: Any, mode: str) -> Any:
        from dualopt.torch import DualOpt

        hps = group_hyperparams(mode)
        groups: list[dict[str, Any]] = []
        for name in NAMES:  # one group per distinct HyperParams, in parameter order
            tname = _TORCH_NAME[name]
            entry = (tname, model.get_parameter(tname))
            for g in groups:
                if g["_hp"] == hps[name]:
                    g["params"].append(entry)
                    break
            else:
                groups.append({"_hp": hps[name], "params": [entry]})
        groups = [{"params": g["params"], **torch_group(g["_hp"])} for g in groups]
        layer_index = {_TORCH_NAME[n]: k for n, k in zip(NAMES, LAYER_INDEX)}
        return DualOpt(groups, lr=problem.lr, layer_index=layer_index, foreach=foreach, _policy=policy)

    return make


class TorchDualOpt:
    """:class:`dualopt.torch.DualOpt`, reference loop (``foreach=False``) or fast path (``foreach=True``)."""

    def __init__(self, *, foreach: bool) -> None:
        self.foreach = foreach
        self.policy: Any = None  # the fast path's default Policy
        self.name = "torch DualOpt (fast path)" if foreach else "torch DualOpt (reference loop)"
        self.framework = "torch"
        # Tolerance class (spec/TOLERANCES.md): torch's CPU sqrt is not correctly rounded; the
        # fast path's fused Adam kernel also evaluates the same formula in another order
        # (measured well inside the class's 4 eps per step, see FAST_PATH_TOLERANCE in conformance/tolerances.py).
        self.numerics = "torch"

    def unavailable(self) -> str | None:
        return _missing()

    def supports(self, case: Case) -> bool:
        return True

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        return {case_id(c): replay_case(c, foreach=self.foreach, policy=self.policy) for c in cases}

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        make = _dualopt_for(problem, self.foreach, self.policy)
        return {mode: train_closed_loop(problem, make, mode) for mode in modes}


class TorchNative(TorchDualOpt):
    """The fast path with ``Policy(native_min_numel=0)``: Adam finetune tensors of every size take the C kernel."""

    def __init__(self) -> None:
        super().__init__(foreach=True)
        self.name = "torch DualOpt (C kernel)"

    def unavailable(self) -> str | None:
        return _missing() or c_kernel_unavailable()

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        self._use_native()
        return super().replay_cases(cases)

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        self._use_native()
        return super().train(problem, modes)

    def _use_native(self) -> None:
        from dualopt.torch import _native as _torch_native
        from dualopt.torch._kernels import Policy

        status = _torch_native.native_status()
        if not status["enabled"]:
            raise RuntimeError(f"the C kernel did not load: {status['reason']}")
        self.policy = Policy(native_min_numel=0)


class TorchAdam:
    """``torch.optim.Adam`` (same betas and eps as mode ``none``): the degenerate comparison only."""

    name = "torch.optim.Adam"
    framework = "torch"
    numerics = "native"

    def unavailable(self) -> str | None:
        return _missing()

    def supports(self, case: Case) -> bool:
        return False

    def replay_cases(self, cases: Sequence[Case]) -> dict[str, Trajectory]:
        raise NotImplementedError("torch.optim.Adam has no open-loop replay (it is not DualOpt)")

    def train(self, problem: Problem, modes: Sequence[str]) -> dict[str, Trajectory]:
        if any(mode != "none" for mode in modes):
            raise NotImplementedError("torch.optim.Adam only trains mode 'none' (rho = 0)")

        def make(model: Any, mode: str) -> Any:
            import torch

            hp = group_hyperparams(mode)[NAMES[0]]
            return torch.optim.Adam(model.parameters(), lr=problem.lr, betas=(hp.beta1, hp.beta2), eps=EPS)

        return {mode: train_closed_loop(problem, make, mode) for mode in modes}


def implementations() -> list[Implementation]:
    return [TorchDualOpt(foreach=False), TorchDualOpt(foreach=True), TorchNative(), TorchAdam()]

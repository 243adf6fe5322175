"""The DualOpt optimizer class for PyTorch (the public names are re-exported by :mod:`dualopt.torch`)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from decoupled_core import (HyperParams, accepted, compute_dtype, invalid, number_layers, pull_rate,
                            resolve_rollback_max, validate, warn_finetune_weight_decay)

from .._shared.torch_lists import grads_finite, nonfinite_flag
from ._kernels import DEFAULT_POLICY, FastPlan, Policy, init_state, loop_update, state_problem
from ._integrations import is_no_pull, no_pull_param_groups, peft_param_groups
from ._setup import Anchors, LayerKeys, check_param, display_names, head_split, make_anchor

__all__ = ["DualOpt", "STATE_FORMAT", "is_no_pull", "no_pull_param_groups", "peft_param_groups"]

#: Format tag of DualOpt's state: the value of the ``"dualopt"`` key of every param group; checked on load.
STATE_FORMAT = "dualopt.torch/1"

# Optimizer-wide facts ride in every param group (like torch's schedulers' ``initial_lr``):
# torch.distributed.checkpoint's state-dict helpers keep only ``state`` and ``param_groups``,
# and the groups' keys survive them (flattened or not), a top-level entry does not.
_FORMAT_KEY, _SKIPPED_KEY = "dualopt", "skipped"

# Canonical core names -> the names a torch user types (for error messages).
_PUBLIC_NAMES = {"beta1": "betas[0]", "beta2": "betas[1]"}
_TENSOR_LR = "a tensor holding one such value (any shape with one element, as torch.optim takes it)"
_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "anchor")
_DIRECTION_STATE = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def _label(name: str) -> str:
    """A parameter's name inside a message: quoted when it is a ``named_parameters()`` name; a
    positional ``param_groups[i]['params'][j]`` stays bare (quoting it again would escape its quotes)."""
    return name if name.startswith("param_groups[") else repr(name)


def _group_hp(group: Mapping[str, Any]) -> HyperParams:
    beta1, beta2 = group["betas"]
    return HyperParams(
        direction=group["direction"], beta1=beta1, beta2=beta2, eps=group["eps"], momentum=group["momentum"],
        nesterov=group["nesterov"], paradigm=group["paradigm"], weight_decay=group["weight_decay"],
        rollback_max=group["rollback_max"], rollback_min=group["rollback_min"],
        rollback_power=group["rollback_power"])


class DualOpt(torch.optim.Optimizer):
    """DualOpt: Adam or SGD-momentum direction, then a layer-wise pull to an anchor.

    Parameters
    ----------
    params : iterable
        Tensors, ``model.named_parameters()``, or param-group dicts. Any
        hyperparameter below except ``layer_index``, ``anchor`` and
        ``nonfinite`` may be set per group (``paradigm`` included). A group may
        carry its own ``"layer_index"`` list (one key per tensor).
    lr : float
        Learning rate eta (schedulers rewrite ``group["lr"]``).
    direction : {"adam", "sgd"}
        Adam (bias-corrected) or heavy-ball SGD with ``dampening=0``.
    betas : (float, float)
        Adam's beta1, beta2, read from the group at every step (OneCycleLR may
        cycle beta1).
    eps : float
        Adam's epsilon, added after the bias-corrected square root.
    momentum, nesterov
        SGD direction's momentum (read at every step) and Nesterov switch.
    paradigm : {"scratch", "finetune", "none"}
        scratch: pull to zero with rate ``weight_decay * (l + 1) / L``;
        finetune: pull to the anchor with rate
        ``rollback_min + (1 - l / (L - 1)) ** rollback_power * (rollback_max - rollback_min)``;
        none: no pull. Fixed at construction.
    weight_decay : float
        lambda, the deepest scratch layer's rate.
    rollback_max, rollback_min, rollback_power : float
        kappa_max (None: ``0.01 / lr`` of the group at construction, stored
        resolved), kappa_min and p of the finetune schedule.
    layer_index : None, "module", callable, dict or sequence
        Layer keys. ``None``: every tensor is its own layer, in the optimizer's
        parameter order. ``"module"``: one layer per module (weight and bias
        share a rate). A callable of the parameter name (e.g. one layer per
        transformer block), a dict name -> int (both need
        ``named_parameters()``), or a sequence with one int per tensor. Layers
        are numbered per paradigm across *all* groups: within a paradigm the
        distinct keys are sorted, ``l`` is the rank, ``L`` the count.
    anchor : dict or sequence, optional
        Finetune anchors: a dict name -> tensor (every finetune parameter
        needs an entry; other entries are ignored) or a sequence aligned with
        the parameters (``None`` entries snapshot). Default: a float copy of
        each finetune tensor at construction — load pretrained weights first.
        Shapes must match; the dtype must be the parameter's or its compute
        dtype.
    maximize : bool
        Maximise the objective (the gradient is negated).
    foreach : bool or None
        ``False``: the reference loop over ``decoupled_core.step_tensor``.
        ``None``/``True``: the fast multi-tensor path on CPU and CUDA: Adam
        through torch's fused kernel and a multi-tensor pull, equal to the
        reference path within ``conformance.tolerances.FAST_PATH_TOLERANCE``;
        SGD through the core on lists of tensors, bitwise. On CPU, large Adam
        finetune tensors take a small C kernel built on first use with the
        system compiler (step and pull in one pass, bitwise the core);
        ``DUALOPT_NATIVE=0`` turns it off, and without a compiler nothing
        changes but speed (``dualopt.torch._native.native_status()`` says why).
    nonfinite : {"skip", "propagate"}
        ``"skip"``: a ``step()`` whose gradients hold any NaN/Inf changes
        nothing and increments :attr:`skipped`. ``"propagate"``: no check.
    _policy : dualopt.torch._kernels.Policy, optional
        Private hook (tests, the conformance suite): which tensors the fast
        path hands to which kernel. Default: ``DEFAULT_POLICY``.

    Notes
    -----
    - State per tensor (``optimizer.state[p]``): ``step`` (a 0-d float32 tensor
      on the parameter's device, as torch's fused Adam keeps it), ``exp_avg`` and
      ``exp_avg_sq`` (adam) or ``momentum_buffer`` (sgd), ``anchor`` (finetune),
      in the compute dtype: float32 for float16/bfloat16 parameters, else the
      parameter's dtype. It is created with the optimizer (constructor and
      :meth:`add_param_group`): ``step = 0`` and zero moments for every tensor
      that requires grad, so ``state_dict()`` of a fresh optimizer is complete
      and is the template ``torch.distributed.checkpoint`` loads into (torch's
      own optimizers create it at the first step). A frozen
      (``requires_grad=False``) tensor gets only its anchor; its moments appear
      when it first has a gradient. Tensors without a gradient are skipped and
      their ``step`` does not advance (it stays 0 until their first update).
    - :meth:`add_param_group` renumbers the layers of every paradigm across all
      groups (so rates of existing tensors can change, e.g. when unfreezing
      more finetune layers) and anchors the new finetune tensors at their
      current values. A constructor ``layer_index`` sequence does not cover new
      parameters: give the new group its own ``"layer_index"``.
    - Every param group carries ``"dualopt": STATE_FORMAT`` (the format tag) and
      ``"skipped"`` (the optimizer's skip counter, the same in every group), so
      ``state_dict()`` carries both through torch's distributed helpers
      (``get_state_dict``/``set_state_dict``, ``get_optimizer_state_dict``/
      ``set_optimizer_state_dict``, flattened or not, ``dcp.save``/``dcp.load``).
      :meth:`load_state_dict` rejects dicts without the tag (another
      optimizer's), restores the saved anchors and keeps float32 state float32
      for float16/bfloat16 parameters.
    - Create the optimizer after converting the model (``model.double()``,
      ``.float()``, ``.to(device)``): the state is made for the parameters' dtype
      and device then. A parameter converted later makes ``step()`` raise a
      ``RuntimeError`` that names it, before anything is updated (as
      ``torch.optim.Adam`` fails too); ``opt.load_state_dict(opt.state_dict())``
      converts the state to the parameters as they are now.
    - On CUDA (and under ``torch.compile`` on any device) a step never waits
      for the device: the NaN/Inf check leaves a 0-d flag on the device,
      torch's fused kernel takes it as ``found_inf``, SGD and ``foreach=False``
      as the core's ``keep``, the pull is a select and the step counts advance
      by ``1 - flag``. ``torch.compile(opt.step, fullgraph=True)`` traces it
      whole. The C kernel (CPU) and sharded (DTensor) gradients read the flag
      on the host, and a tensor ``lr`` is read as a float.
    - ``torch.amp.GradScaler`` hands its scale and its inf flag to ``step()``
      (``_step_supports_amp_scaling``): the gradients are checked once, by the
      scaler, and unscaled inside the fused kernel. Steps it skips are not
      counted in :attr:`skipped`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *, direction: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9,
                 nesterov: bool = False, paradigm: str = "scratch", weight_decay: float = 1e-2,
                 rollback_max: float | None = None, rollback_min: float = 0.0, rollback_power: float = 1.0,
                 layer_index: None | str | Callable[[str], int] | Mapping[str, int] | Sequence[int] = None,
                 anchor: Mapping[str, torch.Tensor] | Sequence[torch.Tensor | None] | None = None,
                 maximize: bool = False, foreach: bool | None = None, nonfinite: str = "skip",
                 _policy: Policy | None = None) -> None:
        validate(HyperParams(), nonfinite=nonfinite)
        if _policy is not None and not isinstance(_policy, Policy):
            raise invalid("_policy", _policy, "a dualopt.torch._kernels.Policy or None")
        self.nonfinite = nonfinite
        self._policy = DEFAULT_POLICY if _policy is None else _policy
        self._skipped = 0  # before super().__init__: add_param_group copies it into each group
        # Skips decided on the device (sync-free path), one 0-d int64 tensor per device; read by `skipped`.
        self._skip_counts: dict[str, torch.Tensor] = {}
        self._layer_keys = LayerKeys(layer_index)
        self._anchor_arg = Anchors(anchor)
        self._all_defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov,
                                  direction=direction, paradigm=paradigm, weight_decay=weight_decay,
                                  rollback_max=rollback_max, rollback_min=rollback_min,
                                  rollback_power=rollback_power, maximize=maximize, foreach=foreach)
        self._check_group(dict(self._all_defaults), None)
        defaults = dict(self._all_defaults)
        if direction == "sgd":
            # OneCycleLR/CyclicLR cycle betas[0] when "betas" is in the defaults, else "momentum".
            defaults.pop("betas")
        self._layout: list[list[tuple[int, int]]] = []
        self._rate_cache: list[Any] = []
        self._decay_given: set[int] = set()  # groups that set their own weight_decay (for the warning only)
        super().__init__(params, defaults)
        self._warn_zero_decay(range(len(self.param_groups)), self._decay_given)
        del self._decay_given
        total = sum(len(g["params"]) for g in self.param_groups)
        self._layer_keys.check_complete(total)
        self._anchor_arg.check_complete(total)
        self._renumber()

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_finetuning(cls, model: torch.nn.Module, head: str | Sequence[str] | None = None, *,
                       lr: float = 1e-3, head_lr: float | None = None, head_paradigm: str = "scratch",
                       head_weight_decay: float | None = None,
                       no_pull: bool | Callable[[str, torch.Tensor, torch.nn.Module], bool] = False,
                       **kwargs: Any) -> "DualOpt":
        """The common fine-tuning setup: pretrained backbone in ``finetune``, a new head in ``head_paradigm``.

        Parameters
        ----------
        model : torch.nn.Module
            With its pretrained weights already loaded (anchors are snapshotted now).
        head : str or list of str, optional
            Name(s) of the head submodule(s), e.g. ``"fc"`` or ``"classifier"``;
            ``None`` fine-tunes everything.
        lr, head_lr : float
            Learning rates of the backbone and the head (``head_lr`` defaults to ``lr``).
        head_paradigm : {"scratch", "none", "finetune"}
            The head's paradigm.
        head_weight_decay : float, optional
            The head's ``weight_decay`` (lambda of the scratch ramp); default
            the optimizer's.
        no_pull : bool or callable
            ``True``: biases and norms get ``paradigm="none"`` (no rollback, no
            decay), Hugging Face's no-decay convention, by :func:`is_no_pull`;
            a callable ``(name, param, module) -> bool`` is used instead of
            that rule (see :func:`no_pull_param_groups`). ``False`` (default):
            they are pulled like the other tensors.
        **kwargs
            Any other constructor argument (``betas``, ``rollback_max``,
            ``layer_index="module"``, ...), except ``paradigm``.

        Only parameters with ``requires_grad=True`` are optimised.

        Examples
        --------
        >>> import torch
        >>> from dualopt.torch import DualOpt
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> opt = DualOpt.for_finetuning(net, head="1", lr=1e-2)
        >>> [(g["paradigm"], g["param_names"]) for g in opt.param_groups]
        [('finetune', ['0.weight', '0.bias']), ('scratch', ['1.weight', '1.bias'])]
        >>> opt.param_groups[0]["rollback_max"]   # 0.01 / lr
        1.0
        >>> opt = DualOpt.for_finetuning(net, head="1", no_pull=True)   # biases and norms: no pull
        >>> [(g["paradigm"], g["param_names"]) for g in opt.param_groups]
        [('finetune', ['0.weight']), ('none', ['0.bias']), ('scratch', ['1.weight']), ('none', ['1.bias'])]
        """
        if "paradigm" in kwargs:
            raise invalid("paradigm", kwargs["paradigm"], "no paradigm argument: for_finetuning sets 'finetune' for "
                          "the backbone and head_paradigm for the head")
        if no_pull is not False:
            if not (no_pull is True or callable(no_pull)):
                raise invalid("no_pull", no_pull, "True, False or a function (name, param, module) -> bool")
            rule = None if no_pull is True else no_pull
            return cls(no_pull_param_groups(model, head, head_paradigm=head_paradigm, head_lr=head_lr,
                                            head_weight_decay=head_weight_decay, no_pull=rule), lr=lr, **kwargs)
        backbone, heads = head_split(model, head)
        groups: list[dict[str, Any]] = []
        if backbone:
            groups.append({"params": backbone, "paradigm": "finetune"})
        if heads:
            hg: dict[str, Any] = {"params": heads, "paradigm": head_paradigm}
            if head_lr is not None:
                hg["lr"] = head_lr
            if head_weight_decay is not None:
                hg["weight_decay"] = head_weight_decay
            groups.append(hg)
        if not groups:
            raise invalid("model", f"<{type(model).__name__}>", "a module with trainable parameters")
        return cls(groups, lr=lr, **kwargs)

    @classmethod
    def for_peft(cls, model: torch.nn.Module, head: str | Sequence[str] | None = None, *, lr: float = 1e-3,
                 **kwargs: Any) -> "DualOpt":
        """A PEFT model (LoRA, DoRA, ...): adapters ``"scratch"``, the frozen base left out (:func:`peft_param_groups`).

        Parameters
        ----------
        model : torch.nn.Module
            A PEFT model, or any module holding PEFT tuner layers.
        head : str or list of str, optional
            A newly initialised head among the trainable non-adapter tensors.
        lr : float
            The optimizer's learning rate.
        **kwargs
            :func:`peft_param_groups`'s keywords (``adapter_lr``,
            ``adapter_weight_decay``, ``head_paradigm``, ``head_lr``,
            ``head_weight_decay``, ``no_pull``) go to it; everything else to
            the constructor (``paradigm`` is refused: the groups set it).
        """
        if "paradigm" in kwargs:
            raise invalid("paradigm", kwargs["paradigm"], "no paradigm argument: for_peft sets each group's paradigm")
        group_keys = ("adapter_lr", "adapter_weight_decay", "head_paradigm", "head_lr", "head_weight_decay", "no_pull")
        group_kw = {k: kwargs.pop(k) for k in group_keys if k in kwargs}
        return cls(peft_param_groups(model, head, **group_kw), lr=lr, **kwargs)

    def _check_group(self, group: dict[str, Any], group_index: int | None) -> None:
        """Validate one group's hyperparameters (spec wording) and resolve rollback_max in place."""
        betas = group["betas"]
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise invalid("betas", betas, "a pair (beta1, beta2) of floats in [0, 1)")
        if not isinstance(group["maximize"], bool):
            raise invalid("maximize", group["maximize"], "True or False")
        if group["foreach"] not in (None, True, False):
            raise invalid("foreach", group["foreach"], "None, True or False")
        hp = _group_hp(group)
        lr = group["lr"]
        also = None  # the core's wording, word for word, unless a tensor was given
        if isinstance(lr, torch.Tensor):
            # torch.optim takes a tensor lr of one element, of any shape; the core reads a 0-d one as a number.
            also = {"lr": (_TENSOR_LR,)}
            if lr.numel() != 1:
                raise invalid("lr", f"<tensor of shape {tuple(lr.shape)}>", accepted("lr", also["lr"]))
            lr = lr.detach().reshape(())
        validate(hp, lr=lr, nonfinite=self.nonfinite, names=_PUBLIC_NAMES, also_accepted=also)
        if hp.paradigm == "finetune":
            group["rollback_max"] = resolve_rollback_max(hp.rollback_max, lr, names=_PUBLIC_NAMES)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see the class notes: layers are renumbered across all groups)."""
        given_decay = isinstance(param_group, dict) and "weight_decay" in param_group  # before torch fills defaults
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            for key, value in self._all_defaults.items():
                group.setdefault(key, value)
            names = display_names(group, gi)
            for p, name in zip(group["params"], names):
                check_param(p, name)
            self._check_group(group, gi)
            offset = sum(len(g["params"]) for g in self.param_groups[:gi])
            group["layer_index"] = self._layer_keys.keys_for(group, gi, offset)
            anchors: list[torch.Tensor | None] = [None] * len(group["params"])
            if group["paradigm"] == "finetune":
                given = self._anchor_arg.given(group, gi, offset)
                anchors = [make_anchor(p, name, a) for p, name, a in zip(group["params"], names, given)]
        except Exception:
            self.param_groups.pop()
            raise
        group[_FORMAT_KEY] = STATE_FORMAT
        group[_SKIPPED_KEY] = self._skipped
        for p, a in zip(group["params"], anchors):
            st = self.state[p]
            if a is not None:
                st["anchor"] = a
            if p.requires_grad:  # the whole state now (class notes), as torch's helpers expect it
                init_state(st, p, group["direction"])
        if self._layer_keys.constructed:
            self._warn_zero_decay([gi], {gi} if given_decay else set())
            self._renumber()
        elif given_decay:
            self._decay_given.add(gi)

    def _warn_zero_decay(self, indices: Sequence[int], given: set[int]) -> None:
        """Warn for finetune groups whose weight_decay=0 was meant to turn their pull off.

        A group's own ``weight_decay=0`` always warns; the constructor's only
        when no scratch group exists (else it is the scratch groups' lambda).
        """
        scratch = any(g["paradigm"] == "scratch" for g in self.param_groups)
        for gi in indices:
            g = self.param_groups[gi]
            if g["paradigm"] == "finetune" and g["weight_decay"] == 0 and (gi in given or not scratch):
                warn_finetune_weight_decay(where=f"finetune param group {gi}", stacklevel=4)

    def _renumber(self) -> None:
        """(l, L) of every tensor, per paradigm across all groups (spec section 3)."""
        paradigms: list[str] = []
        keys: list[int] = []
        for g in self.param_groups:
            paradigms += [g["paradigm"]] * len(g["params"])
            keys += list(g["layer_index"])
        flat = number_layers(paradigms, keys)
        self._layout = []
        start = 0
        for g in self.param_groups:
            self._layout.append(flat[start:start + len(g["params"])])
            start += len(g["params"])
        self._rate_cache = [None] * len(self.param_groups)
        # Fast-path plans hold lists of state tensors: rebuilt after any renumbering or load.
        self._plans: dict[int, FastPlan] = {}
        self._paradigms = [g["paradigm"] for g in self.param_groups]

    def _rates(self, gi: int, hp: HyperParams) -> list[float]:
        key = (hp.paradigm, hp.weight_decay, hp.rollback_max, hp.rollback_min, hp.rollback_power)
        cached = self._rate_cache[gi]
        if cached is None or cached[0] != key:
            cached = (key, [pull_rate(hp.paradigm, l, L, hp) for l, L in self._layout[gi]])
            self._rate_cache[gi] = cached
        return cached[1]

    def layer_rates(self) -> dict[str, float]:
        """The pull rate rho of every tensor, by parameter name, from the groups' current hyperparameters.

        Names are those of ``named_parameters()`` when the optimizer got them,
        else ``"param_groups[i]['params'][j]"``. The pull coefficient of a step
        is ``min(lr * rho, 1)``.

        Examples
        --------
        >>> import torch
        >>> from dualopt.torch import DualOpt
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> DualOpt(net.named_parameters(), lr=0.1, weight_decay=0.4, layer_index="module").layer_rates()
        {'0.weight': 0.2, '0.bias': 0.2, '1.weight': 0.4, '1.bias': 0.4}
        """
        out: dict[str, float] = {}
        for gi, group in enumerate(self.param_groups):
            out.update(zip(display_names(group, gi), self._rates(gi, _group_hp(group))))
        return out

    #: GradScaler then sets ``grad_scale`` and ``found_inf`` on the optimizer instead of unscaling
    #: and checking the gradients itself: one check, and the unscale fuses into the Adam kernel.
    _step_supports_amp_scaling = True

    @property
    def skipped(self) -> int:
        """How many ``step()`` calls were skipped for non-finite gradients (``nonfinite="skip"``).

        Also stored as ``"skipped"`` in every param group, so that it travels in
        :meth:`state_dict` (see the class notes); assigning it updates the groups.
        On CUDA the count lives on the device (``step()`` never waits for it);
        reading it waits for the steps queued so far.
        """
        return self._skipped + sum(int(c) for c in self._skip_counts.values())

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped = int(value)
        self._skip_counts.clear()
        for group in self.param_groups:
            group[_SKIPPED_KEY] = self._skipped

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every tensor that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        all_grads: list[torch.Tensor] = []
        for gi, group in enumerate(self.param_groups):
            if group["paradigm"] != self._paradigms[gi]:
                raise invalid(f"param_groups[{gi}]['paradigm']", group["paradigm"],
                              f"{self._paradigms[gi]!r}: the paradigm is fixed when the optimizer is created")
            params = group["params"]
            idx = [j for j, p in enumerate(params) if p.grad is not None]
            if not idx:
                continue
            grads = [params[j].grad for j in idx]
            for j, g in zip(idx, grads):
                if g.is_sparse:
                    raise RuntimeError(f"DualOpt does not support sparse gradients "
                                       f"({display_names(group, gi)[j]})")
            work.append((gi, group, idx, grads))
            all_grads += grads
        if not work:
            return loss
        # Set by torch.amp.GradScaler for the duration of this call (_step_supports_amp_scaling):
        # its own check's flag, and the scale the gradients still carry.
        scaler_inf: torch.Tensor | None = getattr(self, "found_inf", None)
        grad_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        # Everything is checked before anything changes: an error leaves no tensor and no step count half-updated.
        runs = []
        for gi, group, idx, grads in work:
            hp = _group_hp(group)
            rates_all = self._rates(gi, hp)
            params = group["params"]
            ps = [params[j] for j in idx]
            states = [self.state[p] for p in ps]
            first = "exp_avg" if hp.direction == "adam" else "momentum_buffer"
            for j, p, st in zip(idx, ps, states):
                if first not in st:
                    if hp.paradigm == "finetune" and "anchor" not in st:
                        # e.g. optimizer.state was cleared: pulling towards zero instead would be silent.
                        raise RuntimeError(f"DualOpt: the finetune tensor {_label(display_names(group, gi)[j])} "
                                           "has no 'anchor' in optimizer.state (was the state cleared or replaced?); "
                                           "create a new optimizer, or load a state dict that has its anchor")
                    init_state(st, p, hp.direction)
            rates = [rates_all[j] for j in idx] if len(idx) != len(params) else rates_all
            plan = None
            if group["foreach"] is not False and not torch.compiler.is_compiling():
                # What shapes a plan (see FastPlan); the other hyperparameters are read every step.
                key = (tuple(idx), hp.direction, hp.paradigm, hp.weight_decay, hp.rollback_max, hp.rollback_min,
                       hp.rollback_power)
                plan = self._plans.get(gi)
                if plan is None or plan.key != key or not plan.holds(states):
                    self._check_state(gi, group, idx, ps, grads, states, hp)
                    plan = self._plans[gi] = FastPlan(key, ps, states, rates, hp=hp, policy=self._policy)
            else:
                self._check_state(gi, group, idx, ps, grads, states, hp)
            runs.append((group, hp, ps, grads, states, rates, plan))
        device = all_grads[0].device
        if self._sync_free(runs, all_grads, device):
            # The skip decided on the device (GradScaler's route): nothing is read back to the host.
            flag = scaler_inf
            if flag is None and self.nonfinite == "skip":
                flag = nonfinite_flag(all_grads, device)
                # A dict entry, not an attribute: dynamo drops attribute writes on an optimizer (torch 2.13).
                count = self._skip_counts.get(str(flag.device))
                if count is None:
                    count = self._skip_counts[str(flag.device)] = torch.zeros((), dtype=torch.int64,
                                                                              device=flag.device)
                count.add_(flag.to(torch.int64))
            by: float | torch.Tensor = 1.0
            if flag is not None:
                flag = flag.to(device=device, dtype=torch.float32)
                by = 1.0 - flag  # a skipped step does not count (spec section 8)
            self._advance(runs, by)
            for group, hp, ps, grads, states, rates, plan in runs:
                lr = float(group["lr"])
                if plan is None:  # foreach=False or torch.compile: the core's rule, traced
                    loop_update(ps, grads, states, rates, hp=hp, lr=lr, maximize=group["maximize"], traced=True,
                                found_inf=flag, grad_scale=grad_scale)
                else:
                    plan.run(grads, hp=hp, lr=lr, maximize=group["maximize"], found_inf=flag, grad_scale=grad_scale)
            return loss
        # Host route (CPU, the C kernel, the reference loop, sharded or multi-device gradients).
        if scaler_inf is not None:
            if bool(scaler_inf.item() != 0):
                return loss  # GradScaler's skip: not counted in skipped (it counts its own in its scale)
        elif self.nonfinite == "skip":
            if not grads_finite(all_grads):
                self.skipped += 1
                return loss
        if grad_scale is not None:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for g in all_grads:
                by_device.setdefault(g.device, []).append(g)
            for d, gs in by_device.items():
                torch._foreach_div_(gs, grad_scale.to(d))
        self._advance(runs, 1.0)
        for group, hp, ps, grads, states, rates, plan in runs:
            lr = float(group["lr"])
            if plan is None:
                loop_update(ps, grads, states, rates, hp=hp, lr=lr, maximize=group["maximize"])
            else:
                plan.run(grads, hp=hp, lr=lr, maximize=group["maximize"])
        return loss

    @staticmethod
    def _advance(runs: Sequence[Any], by: float | torch.Tensor) -> None:
        """Advance the step count of every tensor being updated by ``by``."""
        loose = []
        for run in runs:
            if run[6] is None:
                loose += [st["step"] for st in run[4]]
            else:
                run[6].advance(by)
        if loose:
            torch._foreach_add_(loose, by)

    def _sync_free(self, runs: Sequence[Any], grads: Sequence[torch.Tensor], device: torch.device) -> bool:
        """Whether this step takes the device-side skip (``Policy.sync_free_devices``, or under torch.compile)."""
        if not torch.compiler.is_compiling():
            if device.type not in self._policy.sync_free_devices:
                return False
            # foreach=False (no plan) takes the traced loop; a plan holding the C kernel reads the host.
            if not all(run[6] is None or run[6].sync_free for run in runs):
                return False
        # A sharded (DTensor) gradient's flag needs a cross-rank reduction: the host route does it.
        return all(type(g) is torch.Tensor and g.device == device for g in grads)

    def _check_state(self, gi: int, group: Mapping[str, Any], idx: Sequence[int], ps: Sequence[torch.Tensor],
                     grads: Sequence[torch.Tensor], states: Sequence[dict[str, Any]], hp: HyperParams) -> None:
        """Raise where a gradient or state tensor no longer fits its parameter (dtype, device or shape).

        Run at every step of the reference path and whenever the fast path builds
        a plan (its plans are rebuilt when a parameter's dtype changes).
        ``torch.optim.Adam`` fails here too, with a message about ``lerp``.
        """
        keys = _DIRECTION_STATE[hp.direction] + (("anchor",) if hp.paradigm == "finetune" else ())
        for j, p, g, st in zip(idx, ps, grads, states):
            why = state_problem(p, g, st, keys)
            if why is not None:
                name = _label(display_names(group, gi)[j])
                raise RuntimeError(
                    f"DualOpt: parameter {name} is {p.dtype} on {p.device}, but {why}. Was the model converted "
                    "(model.double(), .float(), .half(), .to(...)) after the optimizer was created? Create the "
                    "optimizer after converting the model, or convert its state to the parameters now with "
                    "opt.load_state_dict(opt.state_dict()). Nothing was updated.")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict()``, with the skip counter brought up to date in every param group."""
        if self._skip_counts:
            self.skipped = self.skipped  # folds the device count into the host one (a read)
        return super().state_dict()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("nonfinite", "_policy", "_skipped", "_layer_keys", "_anchor_arg", "_all_defaults", "_layout",
                    "_rate_cache", "_paradigms"):
            state[key] = self.__dict__[key]
        state["_plans"] = {}  # caches of tensor lists; rebuilt on the next step
        state["_skipped"] = self.skipped  # with the skips counted on the device
        state["_skip_counts"] = {}
        return state

    @staticmethod
    def _saved_skipped(state_dict: Any) -> int:
        """The skip counter of a DualOpt state dict; raises for anything else (e.g. another optimizer's state).

        The layout: every param group tagged ``"dualopt": STATE_FORMAT`` with the counter in ``"skipped"``.
        """
        got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if not isinstance(groups, Sequence) or not all(isinstance(g, Mapping) for g in groups):
            groups = []
        if not groups or any(g.get(_FORMAT_KEY) != STATE_FORMAT for g in groups):
            bad = next((gi for gi, g in enumerate(groups) if g.get(_FORMAT_KEY) != STATE_FORMAT), None)
            found = ""
            if bad is not None and any(_FORMAT_KEY in g for g in groups):  # a tag, but not (everywhere) ours
                found = (f" (its param group {bad} has {_FORMAT_KEY!r}: {groups[bad][_FORMAT_KEY]!r})"
                         if _FORMAT_KEY in groups[bad] else f" (its param group {bad} has no {_FORMAT_KEY!r} tag)")
            raise invalid("state_dict", f"<dict with keys {got}>{found}",
                          f"a DualOpt state dict (every param group with {_FORMAT_KEY!r}: {STATE_FORMAT!r}); "
                          "state from another optimizer cannot be loaded")
        counts = [(f"param group {gi}", g.get(_SKIPPED_KEY)) for gi, g in enumerate(groups)]
        first = counts[0][1]
        for where, n in counts:
            if isinstance(n, bool) or not hasattr(n, "__index__") or int(n) < 0 or n != first:
                raise invalid("state_dict", f"<{where} with {_SKIPPED_KEY}={n!r}>",
                              f"the same non-negative int {_SKIPPED_KEY!r} (the skip counter) in every param group")
        return int(first)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`; rejects other formats and other models, naming the parameter.

        Also what torch's distributed helpers hand over (``set_state_dict``,
        ``set_optimizer_state_dict``): parameters keyed by name, and a frozen
        (``requires_grad=False``) tensor possibly without its entry; it then
        keeps its current state.

        Hooks run where torch's own optimizers run them: the
        ``register_load_state_dict_pre_hook`` hooks first, on a shallow copy of
        ``state_dict`` (what they change or return is what is checked and
        loaded), the post-hooks once loading is complete (they see the final
        state: float32 moments of a bfloat16 parameter, the loaded
        :attr:`skipped`).
        """
        if isinstance(state_dict, Mapping):
            state_dict = state_dict.copy() if hasattr(state_dict, "copy") else dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        skipped = self._saved_skipped(state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise invalid("state_dict", f"<{len(saved_groups)} param groups>",
                          f"{len(self.param_groups)} param groups, like this optimizer")
        saved_state = state_dict["state"]
        originals: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        kept: dict[torch.Tensor, dict[str, Any]] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            names = display_names(group, gi)
            if len(saved["params"]) != len(group["params"]):
                raise invalid("state_dict", f"<param group {gi} with {len(saved['params'])} tensors>",
                              f"{len(group['params'])} tensors in param group {gi}, like this optimizer")
            for key in ("paradigm", "direction"):
                if saved.get(key) != group[key]:
                    raise invalid("state_dict", f"<param group {gi} with {key}={saved.get(key)!r}>",
                                  f"{key}={group[key]!r} like this optimizer's group {gi} (first tensor {_label(names[0])})")
            # Layer keys decide every rate; torch would silently adopt the saved ones (spec 6: refuse).
            saved_keys = list(saved.get("layer_index") or [])
            if saved_keys != list(group["layer_index"]):
                j = next((j for j, (a, b) in enumerate(zip(saved_keys, group["layer_index"])) if a != b),
                         min(len(saved_keys), len(names) - 1))
                raise invalid("state_dict", f"<param group {gi} with layer_index={saved.get('layer_index')!r}>",
                              f"layer_index={list(group['layer_index'])!r} like this optimizer's group {gi} "
                              f"(first differing tensor {_label(names[j])})")
            for j, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                if pid not in saved_state and not p.requires_grad:
                    # torch's distributed helpers save and load state only for tensors that require grad.
                    kept[p] = dict(self.state.get(p, {}))
                    continue
                entry = saved_state.get(pid, {})
                self._check_saved_entry(entry, p, names[j], group)
                originals[p] = {k: entry[k] for k in _STATE_TENSORS if k in entry}
        # torch's method would run the hooks again, the post-hooks before the lines below: it runs without them.
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for p, entries in kept.items():
            self.state[p] = entries
        # torch casts floating state to the parameter's dtype and may alias the
        # caller's tensors: store copies in the compute dtype instead (spec section 6).
        for p, entries in originals.items():
            cd = compute_dtype(p.dtype, torch)
            for k, v in entries.items():
                self.state[p][k] = v.detach().to(device=p.device, dtype=cd, copy=True)
            if "step" in self.state[p]:
                step = self.state[p]["step"]
                step = step.item() if isinstance(step, torch.Tensor) else step
                self.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            for p in group["params"]:
                if p.requires_grad:  # complete what a saved state may lack (tensors never updated before)
                    init_state(self.state[p], p, group["direction"])
        self.skipped = skipped
        self._renumber()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @staticmethod
    def _check_saved_entry(entry: Mapping[str, Any], p: torch.Tensor, name: str, group: Mapping[str, Any]) -> None:
        unknown = set(entry) - set(_STATE_TENSORS) - {"step"}
        if unknown:
            raise invalid("state_dict", f"<state of {_label(name)} with entries {sorted(unknown)}>",
                          f"only 'step' and {_STATE_TENSORS} per tensor")
        for k in _STATE_TENSORS:
            if k in entry:
                v = entry[k]
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise invalid("state_dict", f"<{k} of {_label(name)} with shape {shape}>",
                                  f"the parameter's shape {tuple(p.shape)} (was the state saved for another model?)")
        expected = set(_DIRECTION_STATE[group["direction"]])
        present = set(entry) & set(_DIRECTION_STATE["adam"] + _DIRECTION_STATE["sgd"])
        if present and present != expected:
            raise invalid("state_dict", f"<state of {_label(name)} with {sorted(present)}>",
                          f"{sorted(expected)} for direction={group['direction']!r}")
        if ("anchor" in entry) != (group["paradigm"] == "finetune"):
            raise invalid("state_dict", f"<state of {_label(name)} {'with' if 'anchor' in entry else 'without'} an anchor>",
                          f"an anchor exactly for finetune tensors (paradigm={group['paradigm']!r})")
        if "step" in entry:
            step = entry["step"]
            value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
                raise invalid("state_dict", f"<step of {_label(name)} = {step!r}>", "a non-negative integer step count")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_layer_keys" not in self.__dict__:  # unpickled from a plain torch.optim state
            raise invalid("state", "<pickled without DualOpt attributes>", "a pickled DualOpt")
        self.__dict__.setdefault("_skip_counts", {})
        self.__dict__.setdefault("_policy", DEFAULT_POLICY)

    # ------------------------------------------------------------------ display

    def __repr__(self) -> str:
        lines = [f"DualOpt(nonfinite={self.nonfinite!r}, skipped={self.skipped}"]
        counts: dict[str, int] = {}
        for layout, g in zip(self._layout, self.param_groups):
            if layout:
                counts[g["paradigm"]] = layout[0][1]
        for gi, g in enumerate(self.param_groups):
            keys = ["lr", "direction"]
            keys += ["betas", "eps"] if g["direction"] == "adam" else ["momentum", "nesterov"]
            keys.append("paradigm")
            if g["paradigm"] == "scratch":
                keys.append("weight_decay")
            elif g["paradigm"] == "finetune":
                keys += ["rollback_max", "rollback_min", "rollback_power"]
            keys += ["maximize", "foreach"]
            settings = ", ".join(f"{k}={g[k]!r}" for k in keys)
            layers = sorted({l for l, _ in self._layout[gi]}) if gi < len(self._layout) else []
            span = f"layers {layers[0]}..{layers[-1]} of {counts[g['paradigm']]}" if layers else "no layers"
            lines.append(f"  group {gi}: {len(g['params'])} tensors, {span}; {settings}")
        return "\n".join(lines) + "\n)"

"""Param groups for the training stacks users already have: Hugging Face, PEFT.

Both functions return a list of param-group dicts for :class:`dualopt.torch.DualOpt`
(``DualOpt(groups, lr=...)``, or ``Trainer(optimizer_cls_and_kwargs=(DualOpt,
{"params": groups, ...}))``). Every group holds ``(name, tensor)`` pairs, so a
``layer_index`` given as ``"module"`` or a callable of the name works, and
:meth:`DualOpt.layer_rates` reports by name. Nothing here imports transformers
or peft: PEFT's tuner layers are recognised by the ``adapter_layer_names``
attribute they carry.

No pull for biases and norms
    Hugging Face's ``Trainer`` gives biases and LayerNorm weights no weight
    decay. The DualOpt analogue is ``paradigm="none"``: such tensors get the
    plain Adam / SGD step and are neither pulled to zero nor rolled back. The
    default rule (:func:`is_no_pull`) marks a tensor when its module is a
    normalisation layer, or when a dotted component of its name mentions
    ``bias``, ``layernorm`` or ``rmsnorm``, is ``norm`` or ends in ``_norm``;
    that is the set ``Trainer.get_decay_parameter_names`` leaves out.

What a paradigm means for LoRA
    A LoRA adapter adds ``B @ A`` to a frozen pretrained weight ``W0``; ``B``
    starts at zero, ``A`` at random. ``A`` and ``B`` are new weights, so they
    are ``"scratch"``: pulled toward 0. Pulling them toward 0 pulls the merged
    weight ``W0 + B @ A`` back toward ``W0``, which is what rollback does for a
    full fine-tune, so no separate finetune anchor is needed. DoRA's magnitude
    vector starts at the norms of ``W0``, a pretrained quantity: it is
    ``"finetune"``, anchored at its initial value. The frozen base has no
    gradient and is not handed to the optimizer at all, so it stays bit for
    bit what it was. Other trainable tensors (PEFT's ``modules_to_save``) are
    pretrained weights (``"finetune"``) unless they belong to ``head`` (a new
    head: ``head_paradigm``); biases and norms among them get no pull.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from decoupled_core import invalid

__all__ = ["is_no_pull", "no_pull_param_groups", "peft_param_groups"]

#: A rule ``(name, param, module) -> bool``: True gives the tensor no pull.
NoPullRule = Callable[[str, torch.Tensor, torch.nn.Module], bool]

_NORM_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.LocalResponseNorm,
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
    torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
)

# DoRA's magnitude starts at the pretrained weight's norms: it is rolled back, not decayed.
_PRETRAINED_ADAPTER_NAMES = frozenset({"lora_magnitude_vector"})
# PEFT's modules_to_save wrapper lists its trainable copy of a whole module among its adapter layers; that
# copy is a pretrained module or a new head, not a delta, so it is grouped like any other trainable tensor.
_WHOLE_MODULE_COPIES = frozenset({"modules_to_save"})


def is_no_pull(name: str, param: torch.Tensor, module: torch.nn.Module) -> bool:
    """Hugging Face's no-decay convention: biases and normalisation weights.

    Parameters
    ----------
    name : str
        The parameter's full name in the model (``"encoder.layer.0.output.LayerNorm.weight"``).
    param : torch.Tensor
        The parameter (unused; part of the rule's signature).
    module : torch.nn.Module
        The module that owns the parameter directly.

    Returns
    -------
    bool
        True for a bias or a normalisation layer's weight.
    """
    if isinstance(module, _NORM_TYPES):
        return True
    for part in name.lower().split("."):
        if "bias" in part or "layernorm" in part or "rmsnorm" in part or part == "norm" or part.endswith("_norm"):
            return True
    return False


def _owners(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Every parameter by full name, with the module that owns it directly (shared tensors once)."""
    out: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out[f"{mod_name}.{leaf}" if mod_name else leaf] = (module, p)
    return out


def _matches(name: str, prefix: str) -> bool:
    # A head is named by its module path; PEFT wraps it (``classifier.modules_to_save.default``) and
    # prefixes the model (``base_model.model.``), so a dotted run anywhere in the name counts.
    return f".{prefix}." in f".{name}."


def _head_names(head: str | Sequence[str] | None) -> list[str]:
    if head is None:
        return []
    names = [head] if isinstance(head, str) else list(head)
    for h in names:
        if not isinstance(h, str) or not h:
            raise invalid("head", h, "a module name (a non-empty str) or a list of them")
    return names


def _check_heads(heads: list[str], names: list[str]) -> None:
    for h in heads:
        if not any(_matches(n, h) for n in names):
            sample = ", ".join(repr(n) for n in names[-4:])
            raise invalid("head", h,
                          f"the name of a submodule of the model that owns parameters (last names: {sample})")


def _groups(buckets: dict[tuple[str, bool], list[tuple[str, torch.Tensor]]],
            settings: dict[bool, dict[str, Any]]) -> list[dict[str, Any]]:
    """One group per non-empty (paradigm, is_head) bucket, in a fixed order."""
    groups = []
    for (paradigm, is_head), params in buckets.items():
        if params:
            groups.append({"params": params, "paradigm": paradigm, **settings[is_head]})
    return groups


def no_pull_param_groups(model: torch.nn.Module, head: str | Sequence[str] | None = None, *,
                         head_paradigm: str = "scratch", head_lr: float | None = None,
                         head_weight_decay: float | None = None,
                         no_pull: NoPullRule | None = None) -> list[dict[str, Any]]:
    """Fine-tuning groups with Hugging Face's no-decay convention: biases and norms get no pull.

    Parameters
    ----------
    model : torch.nn.Module
        The model with its pretrained weights loaded (finetune anchors are
        snapshotted when the optimizer is built from these groups).
    head : str or list of str, optional
        Module name(s) of the newly initialised head (``"classifier"``); a
        name matches as a dotted run anywhere in a parameter's name.
        ``None``: everything is backbone.
    head_paradigm : {"scratch", "none", "finetune"}
        The paradigm of the head's weights.
    head_lr, head_weight_decay : float, optional
        ``lr`` and ``weight_decay`` of the head's groups (default: the optimizer's).
    no_pull : callable, optional
        ``(name, param, module) -> bool``; default :func:`is_no_pull`.

    Returns
    -------
    list of dict
        Up to four groups, each with ``(name, tensor)`` pairs: backbone
        ``"finetune"``, backbone ``"none"``, head ``head_paradigm``, head
        ``"none"``; empty ones are left out. Frozen tensors are left out.

    Examples
    --------
    >>> import torch
    >>> from dualopt.torch import DualOpt
    >>> from dualopt.torch import no_pull_param_groups
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    >>> groups = no_pull_param_groups(net, head="2")
    >>> for g in groups:
    ...     print(g["paradigm"], [n for n, _ in g["params"]])
    finetune ['0.weight']
    none ['0.bias', '1.weight', '1.bias']
    scratch ['2.weight']
    none ['2.bias']
    >>> opt = DualOpt(groups, lr=1e-3)
    """
    rule = is_no_pull if no_pull is None else no_pull
    heads = _head_names(head)
    owners = _owners(model)
    _check_heads(heads, list(owners))
    buckets = _backbone_and_head(owners, heads, rule, head_paradigm)
    groups = _groups(buckets, {False: {}, True: _head_settings(head_lr, head_weight_decay)})
    if not groups:
        raise invalid("model", f"<{type(model).__name__}>", "a module with trainable parameters")
    return groups


def _head_settings(lr: float | None, weight_decay: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if lr is not None:
        out["lr"] = lr
    if weight_decay is not None:
        out["weight_decay"] = weight_decay
    return out


def _adapter_names(model: torch.nn.Module) -> dict[str, str]:
    """Full names of PEFT adapter tensors -> their paradigm, read from the tuner layers' ``adapter_layer_names``."""
    out: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        layer_names = getattr(module, "adapter_layer_names", None)
        if not isinstance(layer_names, (tuple, list)):
            continue
        for attr in layer_names:
            if attr in _WHOLE_MODULE_COPIES:
                continue
            holder = getattr(module, attr, None)
            if not isinstance(holder, (torch.nn.Module, torch.nn.Parameter)):
                continue
            paradigm = "finetune" if attr in _PRETRAINED_ADAPTER_NAMES else "scratch"
            base = f"{mod_name}.{attr}" if mod_name else attr
            if isinstance(holder, torch.nn.Parameter):
                out[base] = paradigm
            else:
                for sub, _ in holder.named_parameters():
                    out[f"{base}.{sub}"] = paradigm
    return out


def peft_param_groups(model: torch.nn.Module, head: str | Sequence[str] | None = None, *,
                      adapter_lr: float | None = None, adapter_weight_decay: float | None = None,
                      head_paradigm: str = "scratch", head_lr: float | None = None,
                      head_weight_decay: float | None = None,
                      no_pull: NoPullRule | None = None) -> list[dict[str, Any]]:
    """Groups for a PEFT model (LoRA, DoRA, AdaLoRA, ...): adapters ``"scratch"``, the frozen base left out.

    See the module docstring for why LoRA's A and B are ``"scratch"``.

    Parameters
    ----------
    model : torch.nn.Module
        A PEFT model (``peft.get_peft_model(...)``) or any module holding PEFT
        tuner layers; its frozen base is already loaded.
    head : str or list of str, optional
        Module name(s) of a newly initialised head among the trainable
        non-adapter tensors (PEFT's ``modules_to_save``, e.g. ``"classifier"``).
    adapter_lr, adapter_weight_decay : float, optional
        ``lr`` and ``weight_decay`` (lambda of the scratch ramp) of the adapter groups.
    head_paradigm, head_lr, head_weight_decay
        As in :func:`no_pull_param_groups`.
    no_pull : callable, optional
        Applied to trainable non-adapter tensors only; default :func:`is_no_pull`.

    Returns
    -------
    list of dict
        Non-empty groups, in this order: adapters ``"scratch"``, adapters
        ``"finetune"`` (DoRA magnitudes), other trainable tensors
        ``"finetune"`` and ``"none"``, head ``head_paradigm`` and ``"none"``.

    Raises
    ------
    ValueError
        If the model holds no trainable adapter tensor (not a PEFT model, or
        its adapters are frozen).
    """
    rule = is_no_pull if no_pull is None else no_pull
    heads = _head_names(head)
    owners = _owners(model)
    _check_heads(heads, list(owners))
    adapters = _adapter_names(model)
    adapter_buckets: dict[tuple[str, bool], list[tuple[str, torch.Tensor]]] = {("scratch", False): [],
                                                                             ("finetune", False): []}
    for name, (module, p) in owners.items():
        if p.requires_grad and name in adapters:
            adapter_buckets[(adapters[name], False)].append((name, p))
    buckets = _backbone_and_head({k: v for k, v in owners.items() if k not in adapters}, heads, rule, head_paradigm)
    if not any(adapter_buckets.values()):
        raise invalid("model", f"<{type(model).__name__}>",
                      "a PEFT model with trainable adapter weights (peft.get_peft_model(...), adapters not frozen)")
    adapter_settings = {False: _head_settings(adapter_lr, adapter_weight_decay)}
    return (_groups(adapter_buckets, adapter_settings)
            + _groups(buckets, {False: {}, True: _head_settings(head_lr, head_weight_decay)}))


def _backbone_and_head(owners: dict[str, tuple[Any, torch.Tensor]], heads: Sequence[str], rule: Callable[..., bool],
                       head_paradigm: str) -> dict[tuple[str, bool], list[tuple[str, torch.Tensor]]]:
    """Trainable tensors by (paradigm, in a head): no-pull ones (``rule``) "none", the rest finetune or the head's."""
    buckets: dict[tuple[str, bool], list[tuple[str, torch.Tensor]]] = {
        ("finetune", False): [], ("none", False): [], (head_paradigm, True): [], ("none", True): []}
    for name, (module, p) in owners.items():
        if not p.requires_grad:
            continue
        is_head = any(_matches(name, h) for h in heads)
        if rule(name, p, module):
            buckets[("none", is_head)].append((name, p))
        else:
            buckets[(head_paradigm if is_head else "finetune", is_head)].append((name, p))
    return buckets

"""Construction-time helpers of :mod:`dualopt.torch`: parameter names, layer keys, anchors.

Everything here runs once per parameter group (constructor, ``add_param_group``),
never per step, and raises the spec's shared error message
(``decoupled_core.invalid``) naming the offending parameter.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from decoupled_core import check_anchor, check_layer_count, check_layer_key, init_anchor, invalid

__all__ = ["display_names", "check_param", "LayerKeys", "Anchors", "make_anchor", "head_split"]

#: ``layer_index`` spellings accepted by the constructor (besides per-group lists).
LayerIndexArg = None | str | Callable[[str], int] | Mapping[str, int] | Sequence[int]


def display_names(group: Mapping[str, Any], group_index: int) -> list[str]:
    """The names used in messages: ``named_parameters()`` names when given, else the position."""
    names = group.get("param_names")
    if names is not None:
        return [str(n) for n in names]
    return [f"param_groups[{group_index}]['params'][{j}]" for j in range(len(group["params"]))]


def check_param(p: torch.Tensor, name: str) -> None:
    """Spec section 7: real floating-point tensors only; sparse/complex/integer are rejected at construction."""
    if p.is_sparse or p.layout != torch.strided:
        raise invalid(name, f"<{p.layout} tensor>", "a dense (strided) floating-point tensor")
    if p.is_complex() or not p.is_floating_point():
        raise invalid(name, f"<{p.dtype} tensor>", "a real floating-point tensor (float16, bfloat16, float32 or float64)")


def _check_key(key: Any, name: str) -> int:
    return check_layer_key(f"layer_index[{name!r}]", key)


class LayerKeys:
    """Turns the constructor's ``layer_index`` into one integer key per tensor, group by group.

    Accepted forms: ``None`` (position of the tensor in the optimizer's parameter
    order), ``"module"`` (one layer per module: tensors whose names share the part
    before the last dot, numbered by first appearance), a callable of the
    parameter name, a dict name -> key, or a sequence aligned with all parameters
    (constructor only). A param-group dict may instead carry its own
    ``"layer_index"`` list aligned with its ``"params"``.
    """

    def __init__(self, spec: LayerIndexArg) -> None:
        if isinstance(spec, str) and spec != "module":
            raise invalid("layer_index", spec, "None, 'module', a callable of the parameter name, a dict "
                          "name -> int, or a sequence with one int per parameter")
        if spec is None or isinstance(spec, str) or callable(spec) or isinstance(spec, Mapping):
            self.spec: Any = spec
        else:
            try:
                self.spec = list(spec)
            except TypeError:
                raise invalid("layer_index", spec, "None, 'module', a callable of the parameter name, a dict "
                              "name -> int, or a sequence with one int per parameter") from None
        self._modules: dict[str, int] = {}
        self.constructed = False

    @property
    def is_sequence(self) -> bool:
        return isinstance(self.spec, list)

    def keys_for(self, group: Mapping[str, Any], group_index: int, offset: int) -> list[int]:
        """Layer keys of ``group`` whose first tensor is the ``offset``-th of the optimizer."""
        n = len(group["params"])
        names = display_names(group, group_index)
        own = group.get("layer_index")
        if own is not None:
            if self.spec is not None:
                raise invalid("layer_index", "<given both to the constructor and in a param group>",
                              "layer_index either as a constructor argument or per param group, not both")
            if isinstance(own, (str, bytes)) or not isinstance(own, Sequence):
                raise invalid(f"param_groups[{group_index}]['layer_index']", own,
                              f"a list with one non-negative int per parameter of the group ({n})")
            check_layer_count(f"param_groups[{group_index}]['layer_index']", len(own), n)
            return [_check_key(k, nm) for k, nm in zip(own, names)]
        if self.spec is None:
            return list(range(offset, offset + n))
        if self.is_sequence:
            if self.constructed:
                raise invalid("layer_index", "<a sequence aligned with the constructor's params>",
                              "a 'layer_index' list in the param group passed to add_param_group "
                              "(the constructor's sequence does not cover new parameters)")
            seq = [_check_key(k, nm) for k, nm in zip(self.spec[offset:offset + n], names)]
            # Too short: the total is known only after the last group; check_complete
            # then raises the shared "one layer index per parameter tensor (total)".
            return seq + [0] * (n - len(seq))
        if group.get("param_names") is None:
            raise invalid("layer_index", self.spec if isinstance(self.spec, str) else f"<{type(self.spec).__name__}>",
                          "a sequence of ints or None when params are given without names "
                          "(pass model.named_parameters() to key layers by name)")
        if self.spec == "module":
            keys = []
            for nm in names:
                module = nm.rsplit(".", 1)[0] if "." in nm else ""
                keys.append(self._modules.setdefault(module, len(self._modules)))
            return keys
        if callable(self.spec):
            return [_check_key(self.spec(nm), nm) for nm in names]
        keys = []
        for nm in names:
            if nm not in self.spec:
                raise invalid("layer_index", f"<dict without an entry for {nm!r}>",
                              "a dict with an integer key for every parameter name")
            keys.append(_check_key(self.spec[nm], nm))
        return keys

    def check_complete(self, total: int) -> None:
        """At the end of construction: a sequence must have had exactly one key per parameter."""
        if self.is_sequence:
            check_layer_count("layer_index", len(self.spec), total)
        self.constructed = True


def make_anchor(p: torch.Tensor, name: str, given: torch.Tensor | None) -> torch.Tensor:
    """A finetune anchor: the core's :func:`~decoupled_core.init_anchor` (a copy in the compute dtype, never an
    alias) of ``given`` on ``p``'s device, or of ``p``; ``given`` must fit ``p`` (shape, lossless dtype)."""
    import array_api_compat.torch as xp

    if given is None:
        return init_anchor(p.detach(), xp=xp)
    if not isinstance(given, torch.Tensor):
        raise invalid(f"anchor[{name!r}]", f"<{type(given).__name__}>", "a torch.Tensor (or None to snapshot the parameter)")
    check_anchor(f"anchor[{name!r}]", tuple(given.shape), given.dtype, tuple(p.shape), p.dtype)
    # given's dtype is p's or p's compute dtype (checked), so its compute dtype is p's
    return init_anchor(given.detach().to(device=p.device), xp=xp)


class Anchors:
    """Looks up the user's ``anchor`` argument (dict name -> tensor, or sequence aligned with params)."""

    def __init__(self, spec: Any) -> None:
        self.spec: Mapping[str, Any] | list[Any] | None
        if spec is None or isinstance(spec, Mapping):
            self.spec = spec
        elif isinstance(spec, torch.Tensor):
            raise invalid("anchor", "<a single tensor>", "a dict name -> tensor or a sequence aligned with the params")
        else:
            self.spec = list(spec)
        self.constructed = False

    def given(self, group: Mapping[str, Any], group_index: int, offset: int) -> list[Any]:
        """One entry per tensor of ``group``: a tensor, or None (snapshot)."""
        n = len(group["params"])
        if self.spec is None or self.constructed:
            return [None] * n
        names = display_names(group, group_index)
        if isinstance(self.spec, Mapping):
            if group.get("param_names") is None:
                raise invalid("anchor", "<dict>", "a sequence aligned with the params when they are given without "
                              "names (pass model.named_parameters() to key anchors by name)")
            out = []
            for nm in names:
                if group.get("paradigm") == "finetune" and nm not in self.spec:
                    raise invalid("anchor", f"<dict without an entry for {nm!r}>",
                                  "a dict with a tensor for every finetune parameter name")
                out.append(self.spec.get(nm))
            return out
        seq = self.spec[offset:offset + n]
        if len(seq) != n:
            raise invalid("anchor", f"<{len(self.spec)} entries>", "one entry (tensor or None) per parameter tensor")
        return seq

    def check_complete(self, total: int) -> None:
        if isinstance(self.spec, list) and len(self.spec) != total:
            raise invalid("anchor", f"<{len(self.spec)} entries>", f"one entry (tensor or None) per parameter tensor ({total})")
        self.constructed = True


def head_split(model: torch.nn.Module, head: str | Sequence[str] | None) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """Split ``model``'s trainable named parameters into (backbone, head) by module-name prefix."""
    prefixes = [] if head is None else [head] if isinstance(head, str) else list(head)
    backbone: list[tuple[str, torch.Tensor]] = []
    heads: list[tuple[str, torch.Tensor]] = []
    names = []
    for name, p in model.named_parameters():
        names.append(name)
        if not p.requires_grad:
            continue
        if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
            heads.append((name, p))
        else:
            backbone.append((name, p))
    for pre in prefixes:
        if not any(n == pre or n.startswith(pre + ".") for n in names):
            sample = ", ".join(repr(n) for n in names[-4:])
            raise invalid("head", pre, f"the name of a submodule of the model that owns parameters (last names: {sample})")
    return backbone, heads

"""Which paradigm and layer key each Keras variable gets.

Pure Python (no framework import), so that the rules can be tested and
documented on their own. :class:`dualopt.keras.DualOpt` calls these helpers in
``build()``, once, with the variables in ``var_list`` order (for ``model.fit``
that is ``model.trainable_variables`` order).

Matching a mapping key against a variable
-----------------------------------------
A Keras 3 variable has a ``path`` such as ``"sequential/head/kernel"``. A key
matches a variable when the key is a whole run of path segments of it:
``"head"``, ``"sequential/head"`` and ``"head/kernel"`` all match
``"sequential/head/kernel"``; ``"hea"`` and ``"head/bias"`` do not. When several
keys match, the longest key wins (the most specific); between keys of equal
length, the one listed first wins.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping, Sequence

from decoupled_core import PARADIGMS, HyperparameterError, accepted, check_layer_count, check_layer_key, invalid

__all__ = ["check_saved_counts", "variable_path", "matching_key", "resolve_paradigms", "resolve_layer_keys", "check_paradigm_spec",
           "check_layer_index_spec", "check_keys_match", "LAYER_PER_KERAS_LAYER", "PARADIGM_ALSO_ACCEPTED"]

#: ``layer_index="layer"``: variables of one Keras layer share a key.
LAYER_PER_KERAS_LAYER = "layer"
#: What ``paradigm`` accepts besides one paradigm (appended to the core's text by ``decoupled_core.accepted``).
PARADIGM_ALSO_ACCEPTED = ("a mapping from layer name / variable path to one of them", "a callable taking the variable")


def variable_path(variable: Any) -> str:
    """``variable.path`` (Keras 3), falling back to ``name`` for raw backend variables.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> variable_path(SimpleNamespace(path="model/head/kernel", name="kernel"))
    'model/head/kernel'
    >>> variable_path(SimpleNamespace(name="w:0"))
    'w:0'
    """
    path = getattr(variable, "path", None)
    return str(path if path is not None else variable.name)


def matching_key(keys: Sequence[str], path: str) -> str | None:
    """The key of ``keys`` that matches ``path`` (module docstring), or None.

    Examples
    --------
    >>> matching_key(["head", "model/head/kernel", "body"], "model/head/kernel")
    'model/head/kernel'
    >>> matching_key(["head", "body"], "model/head/bias")
    'head'
    >>> matching_key(["hea"], "model/head/bias") is None
    True
    """
    padded = f"/{path}/"
    best = None
    for key in keys:
        if f"/{key.strip('/')}/" in padded and (best is None or len(key) > len(best)):
            best = key
    return best


def check_paradigm_spec(paradigm: Any, default_paradigm: str) -> tuple[str, ...]:
    """Validate the form of ``paradigm`` and return the paradigms it can produce.

    A callable can produce any paradigm, so all are returned for it.

    Examples
    --------
    >>> check_paradigm_spec({"head": "scratch"}, "finetune")
    ('scratch', 'finetune')
    >>> check_paradigm_spec("none", "scratch")
    ('none',)
    """
    if default_paradigm not in PARADIGMS:
        raise invalid("default_paradigm", default_paradigm, accepted("paradigm"))
    if isinstance(paradigm, str):
        if paradigm not in PARADIGMS:
            raise invalid("paradigm", paradigm, accepted("paradigm", PARADIGM_ALSO_ACCEPTED))
        return (paradigm,)
    if isinstance(paradigm, Mapping):
        for key, value in paradigm.items():
            if not isinstance(key, str) or not key.strip("/"):
                raise invalid("paradigm", dict(paradigm), "a mapping from layer names or variable paths (non-empty "
                              f"str) to one of {PARADIGMS}; key {key!r} is not")
            if value not in PARADIGMS:
                raise invalid(f"paradigm[{key!r}]", value, accepted("paradigm"))
        return tuple(dict.fromkeys([*paradigm.values(), default_paradigm]))
    if callable(paradigm):
        return PARADIGMS
    raise invalid("paradigm", paradigm, accepted("paradigm", PARADIGM_ALSO_ACCEPTED))


def resolve_paradigms(paradigm: Any, default_paradigm: str, variables: Sequence[Any]) -> list[str]:
    """Each variable's paradigm.

    ``paradigm`` is one paradigm for every variable, a mapping from layer name
    or path to paradigm (unmatched variables get ``default_paradigm``), or a
    callable ``f(variable) -> paradigm`` (``None`` means ``default_paradigm``).

    Examples
    --------
    >>> from types import SimpleNamespace as V
    >>> vs = [V(path="seq/body/kernel"), V(path="seq/head/kernel"), V(path="seq/head/bias")]
    >>> resolve_paradigms({"head": "scratch", "head/bias": "none"}, "finetune", vs)
    ['finetune', 'scratch', 'none']
    """
    check_paradigm_spec(paradigm, default_paradigm)
    if isinstance(paradigm, str):
        return [paradigm] * len(variables)
    if isinstance(paradigm, Mapping):
        check_keys_match("paradigm", paradigm, [variable_path(v) for v in variables])
    out = []
    for v in variables:
        path = variable_path(v)
        if isinstance(paradigm, Mapping):
            key = matching_key(list(paradigm), path)
            p = default_paradigm if key is None else paradigm[key]
        else:
            p = paradigm(v)
            p = default_paradigm if p is None else p
            if p not in PARADIGMS:
                raise invalid(f"paradigm({path!r})", p, f"one of {PARADIGMS} or None")
        out.append(p)
    return out


def check_keys_match(name: str, mapping: Mapping[str, Any], paths: Sequence[str]) -> None:
    """Refuse a key of ``mapping`` that matches none of ``paths``: a typo would otherwise go unnoticed.

    With ``paradigm={"haed": "scratch"}`` the new head would silently get
    ``default_paradigm`` (finetune: pulled back to its random initialisation).
    The error names the key, the closest layer names / paths, and the paths.

    Examples
    --------
    >>> check_keys_match("paradigm", {"head": "scratch"}, ["m/head/kernel"])
    >>> try:
    ...     check_keys_match("paradigm", {"haed": "scratch"}, ["m/head/kernel", "m/body/kernel"])
    ... except ValueError as e:
    ...     print(e)
    paradigm key 'haed' matches no variable: did you mean 'head' or 'm/head'? Keys match whole path segments of the variable paths ['m/head/kernel', 'm/body/kernel'].
    """
    for key in mapping:
        if any(matching_key([key], p) for p in paths):
            continue
        # Candidates: every run of whole segments, the forms a key may take.
        runs = {"/".join(seg[i:j]) for seg in (p.split("/") for p in paths)
                for i in range(len(seg)) for j in range(i + 1, len(seg) + 1)}
        close = difflib.get_close_matches(str(key).strip("/"), sorted(runs), n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        shown = list(paths[:20]) + (["..."] if len(paths) > 20 else [])
        raise HyperparameterError(f"{name} key {key!r} matches no variable: {hint}Keys match whole path "
                                  f"segments of the variable paths {shown}.")


def check_layer_index_spec(layer_index: Any) -> None:
    """Validate the form of ``layer_index`` (values are checked in ``build``)."""
    if layer_index is None or layer_index == LAYER_PER_KERAS_LAYER or callable(layer_index):
        return
    if isinstance(layer_index, str):
        raise invalid("layer_index", layer_index, f"None, {LAYER_PER_KERAS_LAYER!r}, a sequence of int, a mapping "
                      "from layer name / variable path to int, or a callable taking the variable")
    if isinstance(layer_index, Mapping):
        for key, value in layer_index.items():
            if not isinstance(key, str) or not key.strip("/"):
                raise invalid("layer_index", dict(layer_index), f"keys that are layer names or variable paths; {key!r} is not")
            check_layer_key(f"layer_index[{key!r}]", value)
        return
    if isinstance(layer_index, Sequence):
        for i, value in enumerate(layer_index):
            check_layer_key(f"layer_index[{i}]", value)
        return
    raise invalid("layer_index", layer_index, f"None, {LAYER_PER_KERAS_LAYER!r}, a sequence of int, a mapping from "
                  "layer name / variable path to int, or a callable taking the variable")


def resolve_layer_keys(layer_index: Any, variables: Sequence[Any]) -> list[int] | None:
    """Each variable's integer layer key, or None for the default (position in ``variables``).

    - ``None``: every variable is its own layer, in ``variables`` order.
    - ``"layer"``: variables of one Keras layer (same path up to the last
      ``/``) share a key; keys follow the order of first appearance.
    - a sequence: one key per variable, in ``variables`` order.
    - a mapping from layer name / path to key: every variable must match a key.
    - a callable ``f(variable) -> int``.

    Examples
    --------
    >>> from types import SimpleNamespace as V
    >>> vs = [V(path="m/a/kernel"), V(path="m/a/bias"), V(path="m/b/kernel")]
    >>> resolve_layer_keys("layer", vs)
    [0, 0, 1]
    >>> resolve_layer_keys({"a": 5, "b": 2}, vs)
    [5, 5, 2]
    """
    check_layer_index_spec(layer_index)
    if layer_index is None:
        return None
    paths = [variable_path(v) for v in variables]
    if isinstance(layer_index, str):  # "layer"
        owners: dict[str, int] = {}
        return [owners.setdefault(p.rsplit("/", 1)[0] if "/" in p else p, len(owners)) for p in paths]
    if isinstance(layer_index, Mapping):
        check_keys_match("layer_index", layer_index, paths)
        keys = []
        for p in paths:
            k = matching_key(list(layer_index), p)
            if k is None:
                raise invalid("layer_index", dict(layer_index), f"a mapping with a key matching every variable; "
                              f"none matches {p!r}")
            keys.append(check_layer_key(f"layer_index[{k!r}]", layer_index[k]))
        return keys
    if isinstance(layer_index, Sequence):
        # One key per variable in var_list order (model.trainable_variables for fit).
        check_layer_count("layer_index", len(layer_index), len(variables))
        return [int(k) for k in layer_index]
    return [check_layer_key(f"layer_index({p!r})", layer_index(v)) for v, p in zip(variables, paths)]


def check_saved_counts(entries: Sequence[Any], names: Sequence[str], positions: Sequence[int] | None = None) -> None:
    """Refuse a saved optimizer state whose integer counters (iterations, step, skipped) are negative.

    A negative step count makes the next bias correction ``1 - beta**t`` exceed 1
    or change sign, and every weight becomes NaN/Inf on the next finite step
    (torch and optax refuse it too). ``entries`` are saved arrays, ``names`` the
    variables they restore and ``positions`` their entry numbers in the file
    (default: 0, 1, ...).

    Examples
    --------
    >>> import numpy as np
    >>> check_saved_counts([np.int64(3), np.zeros(2)], ["iteration", "m"])
    >>> check_saved_counts([np.int64(-1)], ["dual_opt/step"])
    Traceback (most recent call last):
    ...
    decoupled_core.hyperparams.HyperparameterError: optimizer state entry 0 (dual_opt/step)=-1 is invalid: expected a non-negative count (the file is corrupt or was edited).
    """
    for i, entry, name in zip(positions if positions is not None else range(len(entries)), entries, names):
        kind = getattr(getattr(entry, "dtype", None), "kind", "")
        if getattr(entry, "ndim", None) == 0 and kind in "iu" and kind and int(entry) < 0:
            raise invalid(f"optimizer state entry {i} ({name})", int(entry),
                          "a non-negative count (the file is corrupt or was edited)")

"""Read and write the spec's test vectors (format ``dualopt-vectors/1``, see ``vectors/FORMAT.md``).

Floats are stored as C99 hexadecimal strings (``float.hex``; ``"%a"`` in C)
so that every value round-trips exactly in any language.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from decoupled_core import HyperParams

from . import VECTORS_DIR

FORMAT = "dualopt-vectors/1"

__all__ = ["FORMAT", "SCHEMA_FILE", "TensorSpec", "Case", "VectorFormatError", "encode", "decode", "load_case",
           "load_cases", "case_to_json", "vector_files", "schema", "schema_errors", "invariant_errors", "validate"]

#: The JSON Schema of the format lives beside the vectors; it is not a vector file.
SCHEMA_FILE = "schema.json"


def encode(a: np.ndarray) -> list[str]:
    """Row-major hex strings of ``a`` (float32 values are widened exactly to float64 first)."""
    return [float(x).hex() for x in np.asarray(a, dtype=np.float64).reshape(-1)]


def decode(values: list[str], shape: tuple[int, ...], dtype: str) -> np.ndarray:
    flat = np.array([float.fromhex(v) for v in values], dtype=np.float64)
    out = flat.astype(dtype)
    if not np.array_equal(out.astype(np.float64), flat, equal_nan=True):
        raise ValueError(f"vector value not representable in {dtype}")
    return out.reshape(shape)


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    group: int


@dataclass
class Case:
    """One open-loop test case, decoded to numpy arrays of ``dtype``."""

    name: str
    description: str
    dtype: str
    nonfinite: str
    base_lr: float
    groups: list[HyperParams]
    tensors: list[TensorSpec]
    layer_index: list[int] | None
    initial: dict[str, np.ndarray]
    anchor: dict[str, np.ndarray]
    lr: list[float]
    grads: list[dict[str, np.ndarray | None]]
    expected: list[dict[str, np.ndarray]]
    rates: list[float]
    features: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.lr)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def hp(self, name: str) -> HyperParams:
        return self.groups[next(t.group for t in self.tensors if t.name == name)]


def case_to_json(case: Case) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": case.name,
        "description": case.description,
        "dtype": case.dtype,
        "nonfinite": case.nonfinite,
        "features": case.features,
        "base_lr": float(case.base_lr).hex(),
        "groups": [{k: (float(v).hex() if isinstance(v, float) else v) for k, v in g.as_dict().items()}
                   for g in case.groups],
        "tensors": [{"name": t.name, "shape": list(t.shape), "group": t.group} for t in case.tensors],
        "layer_index": case.layer_index,
        "rates": [float(r).hex() for r in case.rates],
        "initial": {k: encode(v) for k, v in case.initial.items()},
        "anchor": {k: encode(v) for k, v in case.anchor.items()},
        "lr": [float(x).hex() for x in case.lr],
        "grads": [{k: (None if v is None else encode(v)) for k, v in step.items()} for step in case.grads],
        "expected": [{k: encode(v) for k, v in step.items()} for step in case.expected],
    }


class VectorFormatError(ValueError):
    """A vector file that breaks ``schema.json`` or an invariant of ``FORMAT.md``; the message names the file
    and the field (a JSON path such as ``$.expected[0]``)."""


#: Keywords of schema.json that only annotate; everything else must be validated below.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "$defs"})
_KEYWORDS = frozenset({"$ref", "type", "const", "enum", "pattern", "minLength", "minimum", "minItems", "uniqueItems",
                       "items", "required", "properties", "additionalProperties", "propertyNames", "anyOf"})
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def _json_equal(a: Any, b: Any) -> bool:
    # JSON has no True == 1: booleans equal only booleans.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def schema_errors(instance: Any, schema: dict[str, Any], root: dict[str, Any] | None = None,
                  path: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema``, each prefixed by the JSON path of the offending field.

    Covers the subset of JSON Schema 2020-12 that ``schema.json`` uses and raises
    ``NotImplementedError`` on any other keyword, so the schema cannot outgrow the
    validator unnoticed.

    Examples
    --------
    >>> schema_errors({"a": []}, {"type": "object", "required": ["a", "b"],
    ...                           "properties": {"a": {"type": "array", "minItems": 1}}})
    ["$: missing required field 'b'", '$.a: 0 items, expected at least 1']
    """
    root = schema if root is None else root
    unknown = set(schema) - _ANNOTATIONS - _KEYWORDS
    if unknown:
        raise NotImplementedError(f"schema keyword(s) {sorted(unknown)} at {path} are outside the supported subset")
    errors: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise NotImplementedError(f"$ref {ref!r} at {path}: only '#/$defs/<name>' references are supported")
        errors += schema_errors(instance, root["$defs"][ref[len("#/$defs/"):]], root, path)
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](instance) for t in names):
            return errors + [f"{path}: {_short(instance)} is not of type {'/'.join(names)}"]
    if "const" in schema and not _json_equal(instance, schema["const"]):
        errors.append(f"{path}: {_short(instance)}, expected {_short(schema['const'])}")
    if "enum" in schema and not any(_json_equal(instance, e) for e in schema["enum"]):
        errors.append(f"{path}: {_short(instance)} is not one of {schema['enum']}")
    if isinstance(instance, str):
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{path}: {_short(instance)} does not match {schema['pattern']}")
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{path}: {_short(instance)} is shorter than {schema['minLength']} characters")
    if _TYPES["number"](instance) and "minimum" in schema and instance < schema["minimum"]:
        errors.append(f"{path}: {instance} is below the minimum {schema['minimum']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(instance)} items, expected at least {schema['minItems']}")
        if schema.get("uniqueItems") and any(_json_equal(a, b) for i, a in enumerate(instance)
                                             for b in instance[i + 1:]):
            errors.append(f"{path}: items are not unique")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += schema_errors(item, schema["items"], root, f"{path}[{i}]")
    if isinstance(instance, dict):
        errors += [f"{path}: missing required field {key!r}" for key in schema.get("required", [])
                   if key not in instance]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if "propertyNames" in schema:
                errors += [f"{e} (a key)" for e in schema_errors(key, schema["propertyNames"], root,
                                                                  f"{path}.{key}")]
            if key in props:
                errors += schema_errors(value, props[key], root, f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected field {key!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(value, extra, root, f"{path}.{key}")
    if "anyOf" in schema:
        branches = [schema_errors(instance, sub, root, path) for sub in schema["anyOf"]]
        if all(branches):
            errors.append(f"{path}: {_short(instance)} matches none of the allowed forms ("
                          + "; ".join(b[0] for b in branches) + ")")
    return errors


def invariant_errors(doc: dict[str, Any], file_name: str | None = None) -> list[str]:
    """The cross-field rules of ``FORMAT.md`` (section 'Invariants', 1-9) for a schema-valid document.

    Examples
    --------
    >>> doc = json.loads((VECTORS_DIR / "adam_none.float64.json").read_text())
    >>> invariant_errors(doc, "adam_none.float64.json")
    []
    >>> doc["expected"][0] = {}
    >>> invariant_errors(doc)[0]
    "$.expected[0]: keys [] are not the tensor names ['w0', 'b0', 'w1', 'b1'] in order"
    """
    errs: list[str] = []
    names = [t["name"] for t in doc["tensors"]]
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    size = {n: math.prod(s) for n, s in shapes.items()}
    if file_name is not None and file_name != f"{doc['name']}.{doc['dtype']}.json":
        errs.append(f"$.name/$.dtype: the file is named {file_name}, expected {doc['name']}.{doc['dtype']}.json")
    if len(set(names)) != len(names):
        errs.append(f"$.tensors: names {names} are not unique")
    for i, t in enumerate(doc["tensors"]):
        if t["group"] >= len(doc["groups"]):
            errs.append(f"$.tensors[{i}].group: {t['group']} is out of range for {len(doc['groups'])} groups")
    if doc["layer_index"] is not None and len(doc["layer_index"]) != len(names):
        errs.append(f"$.layer_index: {len(doc['layer_index'])} entries for {len(names)} tensors")
    if len(doc["rates"]) != len(names):
        errs.append(f"$.rates: {len(doc['rates'])} entries for {len(names)} tensors")
    steps = {"lr": len(doc["lr"]), "grads": len(doc["grads"]), "expected": len(doc["expected"])}
    if len(set(steps.values())) != 1:
        errs.append(f"$.lr/$.grads/$.expected: different numbers of steps {steps}")
    for i, g in enumerate(doc["groups"]):
        if g["paradigm"] == "finetune" and g["rollback_max"] is None:
            errs.append(f"$.groups[{i}].rollback_max: null in a finetune group (must be resolved)")
    finetune = [t["name"] for t in doc["tensors"]
                if t["group"] < len(doc["groups"]) and doc["groups"][t["group"]]["paradigm"] == "finetune"]
    blocks = [("$.initial", doc["initial"], names), ("$.anchor", doc["anchor"], finetune)]
    blocks += [(f"$.grads[{k}]", s, names) for k, s in enumerate(doc["grads"])]
    blocks += [(f"$.expected[{k}]", s, names) for k, s in enumerate(doc["expected"])]
    for label, block, keys in blocks:
        if list(block) != keys:
            what = "the finetune tensor names" if label == "$.anchor" else "the tensor names"
            errs.append(f"{label}: keys {list(block)} are not {what} {keys} in order")
        for n, values in block.items():
            if values is None:
                if not label.startswith("$.grads"):
                    errs.append(f"{label}.{n}: null outside grads")
            elif n in size and len(values) != size[n]:
                errs.append(f"{label}.{n}: {len(values)} values for shape {shapes[n]} ({size[n]} values)")
    nonfinite = any(v in ("nan", "inf", "-inf") for s in doc["grads"] for a in s.values() if a for v in a)
    missing = any(a is None for s in doc["grads"] for a in s.values())
    if nonfinite != ("nonfinite" in doc["features"]):
        errs.append(f"$.features: 'nonfinite' {'missing' if nonfinite else 'listed'} but the gradients "
                    f"{'hold' if nonfinite else 'hold no'} nan/inf")
    if missing != ("missing_grads" in doc["features"]):
        errs.append(f"$.features: 'missing_grads' {'missing' if missing else 'listed'} but the gradients "
                    f"{'hold' if missing else 'hold no'} null")
    return errs


@functools.lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The format's JSON Schema, ``spec/vectors/schema.json`` (read once)."""
    return json.loads((VECTORS_DIR / SCHEMA_FILE).read_text())


def validate(doc: Any, path: str | Path = "<document>") -> None:
    """Raise :class:`VectorFormatError` unless ``doc`` follows ``schema.json`` and the invariants of FORMAT.md.

    The message names the file and every offending field (the first ten).
    """
    errors = schema_errors(doc, schema())
    if not errors and isinstance(doc, dict):
        # A format mismatch is reported above; the invariants presume a schema-valid document.
        errors = invariant_errors(doc, Path(path).name if str(path) != "<document>" else None)
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise VectorFormatError(f"{path}: not a valid {FORMAT} vector file:\n  " + "\n  ".join(errors[:10]) + more)


def _hp_from_json(d: dict[str, Any]) -> HyperParams:
    def val(v: Any) -> Any:
        if isinstance(v, str) and (v.startswith(("0x", "-0x")) or v in ("inf", "-inf", "nan")):
            return float.fromhex(v)
        return v

    return HyperParams(**{k: val(v) for k, v in d.items()})


def load_case(path: str | Path) -> Case:
    """Load one vector file, validated against ``schema.json`` and the invariants of ``FORMAT.md``.

    Raises
    ------
    VectorFormatError
        The file is not JSON, breaks the schema or an invariant (e.g. a missing
        field, an empty expected step), or holds a value its dtype cannot; the
        message names the file and the field.

    Examples
    --------
    >>> case = load_case(VECTORS_DIR / "adam_scratch.float64.json")
    >>> case.dtype, case.steps > 0
    ('float64', True)
    """
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VectorFormatError(f"{path}: cannot be read as JSON: {exc}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise VectorFormatError(f"{path}: format {got!r}, expected {FORMAT!r}")
    validate(d, path)
    dtype = d["dtype"]
    tensors = [TensorSpec(t["name"], tuple(t["shape"]), t["group"]) for t in d["tensors"]]
    shape = {t.name: t.shape for t in tensors}

    def dec(field: str, k: str, v: list[str]) -> np.ndarray:
        try:
            return decode(v, shape[k], dtype)
        except ValueError as exc:
            raise VectorFormatError(f"{path}: $.{field}.{k}: {exc}") from None

    def _group(i: int, g: dict[str, Any]) -> HyperParams:
        try:
            return _hp_from_json(g)
        except (TypeError, ValueError) as exc:
            raise VectorFormatError(f"{path}: $.groups[{i}]: {exc}") from None

    return Case(
        name=d["name"], description=d["description"], dtype=dtype, nonfinite=d["nonfinite"],
        base_lr=float.fromhex(d["base_lr"]),
        groups=[_group(i, g) for i, g in enumerate(d["groups"])], tensors=tensors, layer_index=d["layer_index"],
        initial={k: dec("initial", k, v) for k, v in d["initial"].items()},
        anchor={k: dec("anchor", k, v) for k, v in d["anchor"].items()},
        lr=[float.fromhex(x) for x in d["lr"]],
        grads=[{k: (None if v is None else dec(f"grads[{t}]", k, v)) for k, v in s.items()}
               for t, s in enumerate(d["grads"])],
        expected=[{k: dec(f"expected[{t}]", k, v) for k, v in s.items()} for t, s in enumerate(d["expected"])],
        rates=[float.fromhex(r) for r in d["rates"]],
        features=list(d.get("features", [])),
    )


def vector_files(directory: str | Path = VECTORS_DIR) -> list[Path]:
    """The vector files in ``directory``, sorted by name (every ``*.json`` except :data:`SCHEMA_FILE`).

    Examples
    --------
    >>> len(vector_files()) > 0 and all(p.name != SCHEMA_FILE for p in vector_files())
    True
    """
    return sorted(p for p in Path(directory).glob("*.json") if p.name != SCHEMA_FILE)


def load_cases(directory: str | Path = VECTORS_DIR, *, dtype: str | None = None) -> Iterator[Case]:
    """Every case in ``directory`` (sorted by file name), optionally only one dtype."""
    for p in vector_files(directory):
        case = load_case(p)
        if dtype is None or case.dtype == dtype:
            yield case


def is_finite_case(case: Case) -> bool:
    return all(v is None or bool(np.all(np.isfinite(v))) for s in case.grads for v in s.values())


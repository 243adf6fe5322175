"""Every vector file conforms to spec/vectors/schema.json and to the invariants FORMAT.md lists.

jsonschema is not a dependency, so this module carries a small validator for
the subset of JSON Schema 2020-12 that schema.json uses; it refuses any other
keyword, so the schema cannot silently outgrow it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from dualopt.spec import VECTORS_DIR
from dualopt.spec.vectors import FORMAT, SCHEMA_FILE, vector_files

SCHEMA = json.loads((VECTORS_DIR / SCHEMA_FILE).read_text())
FILES = vector_files()

ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "$defs"}
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: booleans are not numbers (Python's True == 1 is not JSON's)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return a == b


def validate(instance: Any, schema: dict, root: dict, path: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema`` (the subset of 2020-12 used by schema.json)."""
    errors: list[str] = []
    for key in schema:
        if key not in ANNOTATIONS | {
                "$ref", "type", "const", "enum", "pattern", "minLength", "minimum", "minItems", "uniqueItems",
                "items", "required", "properties", "additionalProperties", "propertyNames", "anyOf"}:
            raise NotImplementedError(f"schema keyword {key!r} at {path} is outside the supported subset")
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        errors += validate(instance, root["$defs"][ref[len("#/$defs/"):]], root, path)
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[t](instance) for t in names):
            return errors + [f"{path}: {instance!r:.60} is not of type {schema['type']}"]
    if "const" in schema and not json_equal(instance, schema["const"]):
        errors.append(f"{path}: {instance!r:.60} != const {schema['const']!r}")
    if "enum" in schema and not any(json_equal(instance, e) for e in schema["enum"]):
        errors.append(f"{path}: {instance!r:.60} not in {schema['enum']}")
    if isinstance(instance, str):
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{path}: {instance!r} does not match {schema['pattern']}")
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
    if TYPES["number"](instance) and "minimum" in schema and instance < schema["minimum"]:
        errors.append(f"{path}: {instance} < minimum {schema['minimum']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if schema.get("uniqueItems") and any(json_equal(a, b) for i, a in enumerate(instance)
                                             for b in instance[i + 1:]):
            errors.append(f"{path}: items are not unique")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += validate(item, schema["items"], root, f"{path}[{i}]")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing required {key!r}")
        props = schema.get("properties", {})
        for key, value in instance.items():
            if "propertyNames" in schema:
                errors += validate(key, schema["propertyNames"], root, f"{path}.<name {key!r}>")
            if key in props:
                errors += validate(value, props[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected property {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(value, schema["additionalProperties"], root, f"{path}.{key}")
    if "anyOf" in schema:
        if all(validate(instance, sub, root, path) for sub in schema["anyOf"]):
            errors.append(f"{path}: {instance!r:.60} matches none of anyOf")
    return errors


def invariants(doc: dict, file_name: str | None = None) -> list[str]:
    """The cross-field rules of FORMAT.md ('Invariants') that JSON Schema cannot express."""
    errs: list[str] = []
    names = [t["name"] for t in doc["tensors"]]
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    size = {n: math.prod(s) for n, s in shapes.items()}
    if file_name is not None and file_name != f"{doc['name']}.{doc['dtype']}.json":
        errs.append(f"file name {file_name} != <name>.<dtype>.json")
    if len(set(names)) != len(names):
        errs.append("tensor names are not unique")
    for t in doc["tensors"]:
        if t["group"] >= len(doc["groups"]):
            errs.append(f"tensor {t['name']}: group {t['group']} out of range")
    if doc["layer_index"] is not None and len(doc["layer_index"]) != len(names):
        errs.append("layer_index length != number of tensors")
    if len(doc["rates"]) != len(names):
        errs.append("rates length != number of tensors")
    if not (len(doc["lr"]) == len(doc["grads"]) == len(doc["expected"])):
        errs.append("lr, grads and expected have different numbers of steps")
    finetune = [t["name"] for t in doc["tensors"]
                if t["group"] < len(doc["groups"]) and doc["groups"][t["group"]]["paradigm"] == "finetune"]
    for g in doc["groups"]:
        if g["paradigm"] == "finetune" and g["rollback_max"] is None:
            errs.append("a finetune group's rollback_max is not resolved")
    if list(doc["initial"]) != names:
        errs.append("initial keys != tensor names in order")
    if list(doc["anchor"]) != finetune:
        errs.append("anchor keys != the finetune tensors in order")
    blocks = [("initial", doc["initial"]), ("anchor", doc["anchor"])]
    blocks += [(f"grads[{i}]", s) for i, s in enumerate(doc["grads"])]
    blocks += [(f"expected[{i}]", s) for i, s in enumerate(doc["expected"])]
    for label, block in blocks:
        if label.startswith(("grads", "expected")) and list(block) != names:
            errs.append(f"{label} keys != tensor names in order")
        for n, values in block.items():
            if values is not None and n in size and len(values) != size[n]:
                errs.append(f"{label}.{n}: {len(values)} values for shape {shapes[n]}")
            if values is None and not label.startswith("grads"):
                errs.append(f"{label}.{n}: null outside grads")
    nonfinite = any(v in ("nan", "inf", "-inf") for s in doc["grads"] for a in s.values() if a for v in a)
    missing = any(a is None for s in doc["grads"] for a in s.values())
    if nonfinite != ("nonfinite" in doc["features"]):
        errs.append("feature 'nonfinite' does not match the gradients")
    if missing != ("missing_grads" in doc["features"]):
        errs.append("feature 'missing_grads' does not match the gradients")
    return errs


def test_schema_declares_draft_2020_12_and_the_format():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["properties"]["format"] == {"const": FORMAT}


def test_there_are_vector_files_of_both_dtypes():
    assert len(FILES) >= 40
    assert {p.name.split(".")[-2] for p in FILES} == {"float64", "float32"}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_vector_file_conforms(path: Path):
    doc = json.loads(path.read_text())
    assert validate(doc, SCHEMA, SCHEMA) == []
    assert invariants(doc, path.name) == []


@pytest.fixture(scope="module")
def sample() -> dict:
    return json.loads((VECTORS_DIR / "missing_grads.float64.json").read_text())


MUTATIONS = {
    "decimal instead of hex": lambda d: d["lr"].__setitem__(0, "0.01"),
    "uppercase hex": lambda d: d["initial"]["w0"].__setitem__(0, "0X1.0P+0"),
    "nan learning rate": lambda d: d["lr"].__setitem__(0, "nan"),
    "missing field": lambda d: d.pop("rates"),
    "extra field": lambda d: d.__setitem__("seed", 3),
    "wrong format": lambda d: d.__setitem__("format", "dualopt-vectors/2"),
    "unknown dtype": lambda d: d.__setitem__("dtype", "float16"),
    "unknown feature": lambda d: d["features"].append("sparse"),
    "duplicate feature": lambda d: d["features"].append("missing_grads"),
    "bool as hyperparameter": lambda d: d["groups"][0].__setitem__("beta1", True),
    "unknown paradigm": lambda d: d["groups"][0].__setitem__("paradigm", "pretrain"),
    "nesterov as string": lambda d: d["groups"][0].__setitem__("nesterov", "false"),
    "negative layer key": lambda d: d.__setitem__("layer_index", [0, -1]),
    "negative extent": lambda d: d["tensors"][0].__setitem__("shape", [-3, 2]),
    "null in expected": lambda d: d["expected"][0].__setitem__("w0", None),
    "hyperparameter as JSON number": lambda d: d["groups"][0].__setitem__("eps", 1e-8),
}


@pytest.mark.parametrize("mutate", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_schema_rejects_malformed_vectors(sample, mutate):
    doc = copy.deepcopy(sample)
    mutate(doc)
    assert validate(doc, SCHEMA, SCHEMA) != []


BROKEN_INVARIANTS = {
    "values for a different shape": lambda d: d["initial"]["w0"].pop(),
    "step missing": lambda d: d["expected"].pop(),
    "rates too short": lambda d: d["rates"].pop(),
    "anchor for every tensor removed": lambda d: d["anchor"].pop("w1"),
    "group out of range": lambda d: d["tensors"][0].__setitem__("group", 5),
    "feature not declared": lambda d: d.__setitem__("features", []),
    "tensor absent from a step": lambda d: d["grads"][0].pop("w1"),
    "layer_index wrong length": lambda d: d.__setitem__("layer_index", [0]),
    "unresolved rollback_max": lambda d: d["groups"][0].__setitem__("rollback_max", None),
}


@pytest.mark.parametrize("mutate", BROKEN_INVARIANTS.values(), ids=BROKEN_INVARIANTS.keys())
def test_invariant_checks_catch_inconsistent_vectors(sample, mutate):
    doc = copy.deepcopy(sample)
    mutate(doc)
    assert validate(doc, SCHEMA, SCHEMA) == []  # well-formed, yet inconsistent
    assert invariants(doc) != []


def test_validator_refuses_unsupported_keywords():
    with pytest.raises(NotImplementedError, match="oneOf"):
        validate(1, {"oneOf": [{"type": "integer"}]}, {})

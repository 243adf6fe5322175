"""Every vector file conforms to spec/vectors/schema.json and to the invariants FORMAT.md lists.

The validator is the one ``load_case`` uses (``dualopt.spec.vectors.schema_errors``
and ``invariant_errors``: jsonschema is not a dependency); it refuses any keyword
outside the subset of JSON Schema 2020-12 that schema.json uses, so the schema
cannot silently outgrow it. Here it meets malformed and inconsistent documents.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dualopt.spec import VECTORS_DIR
from dualopt.spec.vectors import FORMAT, SCHEMA_FILE, invariant_errors, schema_errors, vector_files

SCHEMA = json.loads((VECTORS_DIR / SCHEMA_FILE).read_text())
FILES = vector_files()


def test_schema_declares_draft_2020_12_and_the_format():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["properties"]["format"] == {"const": FORMAT}


def test_there_are_vector_files_of_both_dtypes():
    assert len(FILES) >= 40
    assert {p.name.split(".")[-2] for p in FILES} == {"float64", "float32"}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_vector_file_conforms(path: Path):
    doc = json.loads(path.read_text())
    assert schema_errors(doc, SCHEMA) == []
    assert invariant_errors(doc, path.name) == []


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
    assert schema_errors(doc, SCHEMA) != []


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
    assert schema_errors(doc, SCHEMA) == []  # well-formed, yet inconsistent
    assert invariant_errors(doc) != []


def test_validator_refuses_unsupported_keywords():
    with pytest.raises(NotImplementedError, match="oneOf"):
        schema_errors(1, {"oneOf": [{"type": "integer"}]})

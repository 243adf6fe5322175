"""Read and write the spec's test vectors (format ``dualopt-vectors/1``, see ``vectors/FORMAT.md``).

Floats are stored as C99 hexadecimal strings (``float.hex``; ``"%a"`` in C)
so that every value round-trips exactly in any language.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from decoupled_core import HyperParams

from . import VECTORS_DIR

FORMAT = "dualopt-vectors/1"

__all__ = ["FORMAT", "SCHEMA_FILE", "TensorSpec", "Case", "encode", "decode", "load_case", "load_cases",
           "case_to_json", "vector_files"]

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


def _hp_from_json(d: dict[str, Any]) -> HyperParams:
    def val(v: Any) -> Any:
        if isinstance(v, str) and (v.startswith(("0x", "-0x")) or v in ("inf", "-inf", "nan")):
            return float.fromhex(v)
        return v

    return HyperParams(**{k: val(v) for k, v in d.items()})


def load_case(path: str | Path) -> Case:
    """Load one vector file.

    Examples
    --------
    >>> case = load_case(VECTORS_DIR / "adam_scratch.float64.json")
    >>> case.dtype, case.steps > 0
    ('float64', True)
    """
    d = json.loads(Path(path).read_text())
    if d.get("format") != FORMAT:
        raise ValueError(f"{path}: format {d.get('format')!r}, expected {FORMAT!r}")
    dtype = d["dtype"]
    tensors = [TensorSpec(t["name"], tuple(t["shape"]), t["group"]) for t in d["tensors"]]
    shape = {t.name: t.shape for t in tensors}
    dec = lambda k, v: decode(v, shape[k], dtype)  # noqa: E731
    return Case(
        name=d["name"], description=d["description"], dtype=dtype, nonfinite=d["nonfinite"],
        base_lr=float.fromhex(d["base_lr"]),
        groups=[_hp_from_json(g) for g in d["groups"]], tensors=tensors, layer_index=d["layer_index"],
        initial={k: dec(k, v) for k, v in d["initial"].items()},
        anchor={k: dec(k, v) for k, v in d["anchor"].items()},
        lr=[float.fromhex(x) for x in d["lr"]],
        grads=[{k: (None if v is None else dec(k, v)) for k, v in s.items()} for s in d["grads"]],
        expected=[{k: dec(k, v) for k, v in s.items()} for s in d["expected"]],
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


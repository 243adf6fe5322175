"""A replayer written only from spec/vectors/FORMAT.md reproduces every committed vector bit for bit.

It reads the JSON itself and uses numpy, the Python standard library and the
tests' independent reading of the rule (``tests/common/oracle.py``), never
``decoupled_core`` or ``dualopt.spec.vectors``: if FORMAT.md left out anything a
porter needs, this test could not have been written to pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualopt.spec import VECTORS_DIR
from tests.common.oracle import Group, layer_rates, spec_step

FILES = sorted(p for p in VECTORS_DIR.glob("*.json") if p.name != "schema.json")


def hexf(s: str) -> float:
    return float.fromhex(s)  # accepts "nan", "inf", "-inf" too


def tensor(values: list[str], shape: list[int], dtype: str) -> np.ndarray:
    wide = np.array([hexf(v) for v in values], dtype=np.float64)
    out = wide.astype(dtype)
    assert np.array_equal(out.astype(np.float64), wide, equal_nan=True), "value not representable in dtype"
    return out.reshape(shape)


def group_value(v):
    return hexf(v) if isinstance(v, str) and v not in ("adam", "sgd", "scratch", "finetune", "none") else v


def groups_of(doc: dict) -> list[Group]:
    """Every tensor's hyperparameters."""
    groups = [Group(**{k: group_value(v) for k, v in g.items()}) for g in doc["groups"]]
    return [groups[t["group"]] for t in doc["tensors"]]


def rates_of(doc: dict) -> list[float]:
    return layer_rates(groups_of(doc), doc["layer_index"])


def replay(doc: dict) -> list[dict[str, np.ndarray]]:
    dt = np.dtype(doc["dtype"]).type
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    names = [t["name"] for t in doc["tensors"]]
    h_of = dict(zip(names, groups_of(doc)))
    rho = dict(zip(names, rates_of(doc)))
    theta = {n: tensor(v, shapes[n], doc["dtype"]) for n, v in doc["initial"].items()}
    anchor = {n: tensor(v, shapes[n], doc["dtype"]) for n, v in doc["anchor"].items()}
    m = {n: np.zeros(shapes[n], dt) for n in names}
    v = {n: np.zeros(shapes[n], dt) for n in names}
    b = {n: np.zeros(shapes[n], dt) for n in names}
    t = {n: 0 for n in names}
    results = []
    for k, lr_hex in enumerate(doc["lr"]):
        eta = hexf(lr_hex)
        grads = {n: None if g is None else tensor(g, shapes[n], doc["dtype"]) for n, g in doc["grads"][k].items()}
        if doc["nonfinite"] == "skip" and any(g is not None and not np.all(np.isfinite(g)) for g in grads.values()):
            results.append({n: theta[n].copy() for n in names})
            continue
        for n in names:
            g = grads[n]
            if g is None:
                continue
            t[n] += 1
            state = (m[n], v[n]) if h_of[n].direction == "adam" else (b[n],)
            theta[n], _, state = spec_step(theta[n], g, state, anchor.get(n), hp=h_of[n], lr=eta, t=t[n], rho=rho[n])
            if h_of[n].direction == "adam":
                m[n], v[n] = state
            else:
                (b[n],) = state
        results.append({n: theta[n].copy() for n in names})
    return results


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_format_md_replayer_reproduces_vectors(path):
    doc = json.loads(path.read_text())
    assert doc["format"] == "dualopt-vectors/1"
    assert rates_of(doc) == [hexf(r) for r in doc["rates"]]
    got = replay(doc)
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    assert len(got) == len(doc["expected"])
    for k, expected in enumerate(doc["expected"]):
        for n, values in expected.items():
            e = tensor(values, shapes[n], doc["dtype"])
            g = got[k][n]
            assert g.dtype == e.dtype and g.shape == e.shape
            bits = f"i{e.itemsize}"
            assert np.array_equal(g.view(bits), e.view(bits)), f"step {k + 1}, tensor {n}"

"""A replayer written only from spec/vectors/FORMAT.md reproduces every committed vector bit for bit.

It reads the JSON itself and uses numpy and the Python standard library, never
``decoupled_core`` or ``dualopt.spec.vectors``: if FORMAT.md left out anything a
porter needs, this test could not have been written to pass.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dualopt.spec import VECTORS_DIR

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


def rates_of(doc: dict) -> list[float]:
    tensors = doc["tensors"]
    groups = [{k: group_value(v) for k, v in g.items()} for g in doc["groups"]]
    keys = doc["layer_index"] if doc["layer_index"] is not None else list(range(len(tensors)))
    paradigm = [groups[t["group"]]["paradigm"] for t in tensors]
    out = []
    for i, t in enumerate(tensors):
        h = groups[t["group"]]
        distinct = sorted({k for k, p in zip(keys, paradigm) if p == paradigm[i]})
        l, L = distinct.index(keys[i]), len(distinct)
        if h["paradigm"] == "scratch":
            out.append(h["weight_decay"] * ((l + 1) / L))
        elif h["paradigm"] == "finetune":
            kmax, kmin, p = h["rollback_max"], h["rollback_min"], h["rollback_power"]
            out.append(kmax if L == 1 else kmin + (1 - l / (L - 1)) ** p * (kmax - kmin))
        else:
            out.append(0.0)
    return out


def replay(doc: dict) -> list[dict[str, np.ndarray]]:
    dt = np.dtype(doc["dtype"]).type
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    groups = [{k: group_value(v) for k, v in g.items()} for g in doc["groups"]]
    names = [t["name"] for t in doc["tensors"]]
    h_of = {t["name"]: groups[t["group"]] for t in doc["tensors"]}
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
            h = h_of[n]
            if h["direction"] == "adam":
                s = eta / (1 - h["beta1"] ** t[n])
                r = 1 / math.sqrt(1 - h["beta2"] ** t[n])
                m[n] = dt(h["beta1"]) * m[n] + dt(1 - h["beta1"]) * g
                v[n] = dt(h["beta2"]) * v[n] + dt(1 - h["beta2"]) * (g * g)
                pre = theta[n] - dt(s) * (m[n] / (np.sqrt(v[n]) * dt(r) + dt(h["eps"])))
            else:
                b[n] = dt(h["momentum"]) * b[n] + g
                u = g + dt(h["momentum"]) * b[n] if h["nesterov"] else b[n]
                pre = theta[n] - dt(eta) * u
            c = min(max(eta * rho[n], 0.0), 1.0)
            if c == 0:
                theta[n] = pre
            elif h["paradigm"] == "finetune":
                theta[n] = pre - dt(c) * (pre - anchor[n])
            else:
                theta[n] = pre - dt(c) * pre
            theta[n] = np.asarray(theta[n], dtype=dt)
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

"""The committed spec vectors are exactly what the generator produces, and the loader round-trips them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualopt.spec import VECTORS_DIR, generate_vectors
from dualopt.spec.vectors import SCHEMA_FILE, case_to_json, decode, encode, load_case, vector_files

FILES = vector_files()


def test_committed_vectors_regenerate_identically(capsys):
    assert generate_vectors.main(["--check"]) == 0, capsys.readouterr().out


def test_check_reports_drift(tmp_path, capsys):
    """--check is not vacuous: a changed, a missing and an unexpected file all fail it."""
    for p in FILES:
        (tmp_path / p.name).write_text(p.read_text())
    (tmp_path / SCHEMA_FILE).write_text("{}")  # the schema beside the vectors is not a vector file
    assert generate_vectors.main(["--check", "--out", str(tmp_path)]) == 0
    changed = tmp_path / FILES[0].name
    changed.write_text(changed.read_text().replace('"0x', '"-0x', 1))
    (tmp_path / FILES[1].name).unlink()
    (tmp_path / "stray.float64.json").write_text("{}")
    assert generate_vectors.main(["--check", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"drift: {FILES[0].name}" in out and f"drift: {FILES[1].name}" in out
    assert "unexpected file: stray.float64.json" in out


def test_generator_writes_what_check_accepts(tmp_path):
    assert generate_vectors.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [p.name for p in FILES]
    assert generate_vectors.main(["--check", "--out", str(tmp_path)]) == 0


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_loader_round_trips(path):
    case = load_case(path)
    assert case_to_json(case) == json.loads(path.read_text())
    assert generate_vectors.render(case) == path.read_text()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hex_encoding_is_exact_for_special_values(dtype):
    finfo = np.finfo(dtype)
    values = np.array([0.0, -0.0, 1.0, -2.5, float(finfo.tiny), float(finfo.smallest_subnormal), float(finfo.max),
                       np.inf, -np.inf, np.nan, 0.1], dtype=dtype)
    text = encode(values)
    assert text[:4] == ["0x0.0p+0", "-0x0.0p+0", "0x1.0000000000000p+0", "-0x1.4000000000000p+1"]
    assert text[7:10] == ["inf", "-inf", "nan"]
    back = decode(text, values.shape, dtype)
    assert back.dtype == values.dtype
    np.testing.assert_array_equal(back.view(f"i{back.itemsize}")[:9], values.view(f"i{values.itemsize}")[:9])
    assert np.isnan(back[9]) and back[10] == values[10]


def test_decode_rejects_values_the_dtype_cannot_hold():
    with pytest.raises(ValueError, match="not representable in float32"):
        decode([(0.1).hex()], (1,), "float32")  # float64 0.1 has more mantissa bits than float32


def test_loader_rejects_other_formats(tmp_path):
    doc = json.loads((VECTORS_DIR / "adam_none.float64.json").read_text())
    doc["format"] = "dualopt-vectors/0"
    p = tmp_path / "x.float64.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="expected 'dualopt-vectors/1'"):
        load_case(p)

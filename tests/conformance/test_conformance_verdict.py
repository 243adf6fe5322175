"""A green run means every selected implementation was checked on every case and agreed (issue 17).

Each test here is one way the verdict could lie: nothing checked, a port that
ends the run, shares or rewrites its inputs, hangs or crashes, malformed
vectors, invalid options, and reports that do not say where a failure is.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dualopt.conformance.external import ReplayImplementation, SubprocessReplay, check_case
from dualopt.conformance.impl_core import replay_reference
from dualopt.conformance.metrics import compare
from dualopt.conformance.report import (_panels, aggregate_table, line_style, render_text, to_json, ulp_cell,
                                        write_report)
from dualopt.conformance.runner import SuiteResult, run_suite
from dualopt.spec import VECTORS_DIR
from dualopt.spec.vectors import (VectorFormatError, invariant_errors, load_case, load_cases, schema, schema_errors,
                                  vector_files)

from tests.conformance._conformance_wrong import replay_in_place, replay_zeros_cheat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CASES = {f"{c.name}.{c.dtype}": c for c in load_cases()}
SMALL = [CASES[k] for k in ("adam_none.float64", "sgd_scratch.float64", "adam_finetune_p1.float64")]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                TF_CPP_MIN_LOG_LEVEL="2")


def _cli(*args: str, cwd: Path = ROOT, exe: list[str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = (exe or [sys.executable, "-m", "dualopt.conformance"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout)


# ---- nothing checked is not green --------------------------------------------------------------------------------

def test_unknown_backend_name_is_a_usage_error_listing_the_valid_ones():
    proc = _cli("--backends", "pytorch", "--report", "")
    assert proc.returncode == 2, proc.stdout
    assert "unknown name(s) 'pytorch'" in proc.stderr and "valid names:" in proc.stderr
    assert "torch" in proc.stderr.split("valid names:")[1] and "PASS" not in proc.stdout


def test_backends_none_without_replay_is_an_empty_selection():
    proc = _cli("--backends", "none", "--report", "")
    assert proc.returncode == 2 and "nothing to check" in proc.stderr, proc.stderr


def test_a_run_that_compares_nothing_does_not_pass():
    empty = SuiteResult()
    assert empty.verdict == "NOTHING CHECKED" and empty.exit_code == 1
    skipped = run_suite(backends=[], cases=SMALL, only="open", progress=None,
                        extra=[type("Gone", (ReplayImplementation,), {"unavailable": lambda self: "not here"})(
                            replay_reference, "gone")])
    assert {r.status for r in skipped.rows} == {"skipped"} and skipped.exit_code == 1


# ---- isolation ------------------------------------------------------------------------------------------------------

def test_a_port_calling_sys_exit_fails_its_cases_and_the_run_goes_on():
    proc = _cli("--backends", "numpy", "--only", "open", "--dtype", "float64", "--report", "", "--quiet",
                "--replay", "_conformance_wrong:replay_exit")
    assert proc.returncode == 1, proc.stderr
    assert "called sys.exit(0)" in proc.stdout and "== aggregate" in proc.stdout
    assert re.search(r"exact +- +core\[numpy\]", proc.stdout), proc.stdout  # the built-in still ran and passed


def test_a_port_stepping_the_case_in_place_changes_nothing_for_the_others():
    # The mutating port runs first; before the fix the core after it replayed the mutated inputs and failed.
    result = run_suite(backends=[], cases=SMALL, only="open", progress=None,
                       extra=[ReplayImplementation(replay_in_place, "in place"),
                              ReplayImplementation(replay_reference, "numpy core after it")])
    assert {r.status for r in result.rows} == {"exact"}, [(r.impl, r.note) for r in result.rows]
    assert all(np.array_equal(SMALL[0].initial[n], CASES["adam_none.float64"].initial[n]) for n in SMALL[0].names)


def test_a_port_overwriting_expected_is_judged_against_the_suites_copy():
    result = run_suite(backends=[], cases=SMALL, only="open", progress=None,
                       extra=[ReplayImplementation(replay_zeros_cheat, "cheat")])
    assert {r.status for r in result.rows} == {"FAIL"} and result.exit_code == 1
    assert check_case(replay_zeros_cheat, copy.deepcopy(CASES["adam_none.float32"])).status == "FAIL"


def test_replay_ports_in_subprocesses_hang_crash_shape_and_garbage_each_fail_alone():
    cases = SMALL + [CASES["adam_scratch.float64"]]
    # 15 s: a generous start-up on a loaded machine (the first case also covers importing the port).
    ports = {name: SubprocessReplay(f"_conformance_wrong:{name}", timeout=15, directory=str(HERE))
             for name in ("replay_hang", "replay_crash", "replay_wrong_shape", "replay_not_arrays", "replay_in_place")}
    t0 = time.perf_counter()
    result = run_suite(backends=[], cases=cases, only="open", progress=None, jobs=2, extra=list(ports.values()))
    assert time.perf_counter() - t0 < 120
    by = {(r.impl, r.case): r for r in result.rows}

    def row(port: str, cid: str):
        return by[(ports[port].name, cid)]

    hang = row("replay_hang", "adam_none.float64")
    assert hang.status == "FAIL" and "no result within 15 s" in hang.note
    assert row("replay_hang", "sgd_scratch.float64").status == "exact"  # restarted for the rest
    crash = row("replay_crash", "sgd_scratch.float64")
    assert crash.status == "FAIL" and "exited with code 3" in crash.note
    assert row("replay_crash", "adam_finetune_p1.float64").status == "exact"
    shape = row("replay_wrong_shape", "adam_scratch.float64")
    assert shape.status == "FAIL" and "expected float64[" in shape.note
    garbage = row("replay_not_arrays", "adam_none.float64")
    assert garbage.status == "FAIL" and "returned a dict" in garbage.note
    assert {r.status for r in result.rows if r.impl == ports["replay_in_place"].name} == {"exact"}


# ---- malformed vectors ----------------------------------------------------------------------------------------------

def _doc(name: str = "adam_none.float64") -> dict:
    return json.loads((VECTORS_DIR / f"{name}.json").read_text())


def _write(tmp_path: Path, doc: dict, name: str = "adam_none.float64.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_empty_expected_steps_are_refused_naming_file_and_field(tmp_path):
    doc = _doc()
    doc["expected"] = [{} for _ in doc["expected"]]
    p = _write(tmp_path, doc)
    with pytest.raises(VectorFormatError, match=re.escape(f"{p}") + r"[\s\S]*\$\.expected\[0\]: keys \[\]"):
        load_case(p)
    proc = _cli("--backends", "numpy", "--vectors", str(tmp_path), "--report", "")
    assert proc.returncode == 2 and "malformed test vectors" in proc.stderr and "$.expected[0]" in proc.stderr


def test_a_missing_field_names_the_file_and_the_field(tmp_path):
    doc = _doc()
    del doc["lr"]
    p = _write(tmp_path, doc)
    with pytest.raises(VectorFormatError, match=r"adam_none\.float64\.json[\s\S]*missing required field 'lr'"):
        load_case(p)


SCHEMA_BREAKS = [
    ("const", lambda d: d.update(format="dualopt-vectors/2"), "expected 'dualopt-vectors/1'"),
    ("type", lambda d: d.update(tensors="w0"), "$.tensors: 'w0' is not of type array"),
    ("enum", lambda d: d.update(dtype="float16"), "$.dtype: 'float16' is not one of"),
    ("pattern", lambda d: d["lr"].__setitem__(0, "0.1"), "$.lr[0]: '0.1' does not match"),
    ("minItems", lambda d: d.update(groups=[]), "$.groups: 0 items, expected at least 1"),
    ("uniqueItems", lambda d: d.update(features=["nonfinite", "nonfinite"]), "$.features: items are not unique"),
    ("additionalProperties", lambda d: d.update(extra=1), "unexpected field 'extra'"),
    ("minimum", lambda d: d["tensors"][0].update(group=-1), "$.tensors[0].group: -1 is below the minimum 0"),
    ("minLength", lambda d: d["initial"].update({"": []}), "shorter than 1 characters (a key)"),
    ("anyOf", lambda d: d.update(layer_index="all"), "$.layer_index: 'all' matches none of the allowed forms"),
    ("boolean", lambda d: d["groups"][0].update(nesterov=0), "$.groups[0].nesterov: 0 is not of type boolean"),
    ("integer", lambda d: d["tensors"][0].update(shape=[1.5]), "$.tensors[0].shape[0]: 1.5 is not of type integer"),
]


@pytest.mark.parametrize("keyword,breaks,message", SCHEMA_BREAKS, ids=[k for k, _, _ in SCHEMA_BREAKS])
def test_the_validator_enforces_every_keyword_the_schema_uses(keyword, breaks, message):
    doc = _doc()
    breaks(doc)
    errors = schema_errors(doc, schema())
    assert any(message in e for e in errors), errors


def test_every_committed_vector_file_is_valid_and_the_validator_refuses_unknown_keywords():
    for p in vector_files():
        doc = json.loads(p.read_text())
        assert schema_errors(doc, schema()) == [] and invariant_errors(doc, p.name) == []
    with pytest.raises(NotImplementedError, match="maxItems"):
        schema_errors([], {"type": "array", "maxItems": 1})


@pytest.mark.parametrize("breaks,message", [
    (lambda d: d["expected"].pop(), "different numbers of steps"),
    (lambda d: d["initial"].update(w0=d["initial"]["w0"][:-1]), "$.initial.w0: "),
    (lambda d: d["tensors"][0].update(group=7), "$.tensors[0].group: 7 is out of range"),
    (lambda d: d.update(rates=d["rates"][:-1]), "$.rates: "),
    (lambda d: d.update(name="other"), "the file is named"),
])
def test_the_invariants_of_format_md_are_enforced(tmp_path, breaks, message):
    doc = _doc()
    breaks(doc)
    with pytest.raises(VectorFormatError, match=re.escape(message)):
        load_case(_write(tmp_path, doc))


# ---- options --------------------------------------------------------------------------------------------------------

def test_a_native_class_for_a_replay_is_refused_before_the_run():
    proc = _cli("--backends", "none", "--replay", "_conformance_wrong:replay_wrong",
                "--replay-numerics", "native-epsilon-hat", "--report", "")
    assert proc.returncode == 2 and "--replay-numerics='native-epsilon-hat' is invalid for a replay" in proc.stderr
    assert proc.stdout == ""
    with pytest.raises(ValueError, match="native-epsilon-hat"):
        ReplayImplementation(replay_reference, "x", numerics="native-epsilon-hat")


def test_an_unusable_report_directory_is_refused_before_the_run(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _cli("--backends", "numpy", "--report", str(blocker / "sub"))
    assert proc.returncode == 2 and "is unusable" in proc.stderr, proc.stderr
    assert proc.stdout == "" and "[open]" not in proc.stderr  # nothing ran


def test_a_replay_module_that_cannot_be_imported_is_refused_before_the_run():
    proc = _cli("--backends", "none", "--replay", "no_such_module_xyz:replay", "--report", "")
    assert proc.returncode == 2 and "No module named 'no_such_module_xyz'" in proc.stderr


def test_the_console_script_imports_the_port_from_the_current_directory(tmp_path):
    (tmp_path / "myport.py").write_text(textwrap.dedent("""
        from dualopt.conformance.impl_core import replay_reference as replay
    """))
    exe = Path(sys.executable).parent / "dualopt-conformance"
    proc = _cli("--backends", "none", "--replay", "myport:replay", "--only", "open", "--dtype", "float32",
                "--report", "", "--quiet", cwd=tmp_path, exe=[str(exe)])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"exact +- +replay \(myport\)", proc.stdout), proc.stdout


# ---- reports that say where -------------------------------------------------------------------------------------

def _one_ulp_off(case):
    traj = replay_reference(case)
    w = traj[2][case.names[0]]
    w.reshape(-1)[1] = np.nextafter(w.reshape(-1)[1], np.inf)
    return traj


def test_a_failure_names_step_tensor_element_values_and_the_case():
    case = CASES["adam_finetune_p1.float64"]
    row = check_case(_one_ulp_off, case, name="off")
    assert row.status == "FAIL"
    idx = np.unravel_index(1, case.initial[case.names[0]].shape)
    where = f"parameter {case.names[0]!r}[{', '.join(str(int(i)) for i in idx)}]"
    assert row.note.startswith(f"step 3/{case.steps}: {where}: expected "), row.note
    assert ", got " in row.note and "1 ulp off; this class must agree bitwise" in row.note
    assert row.description == case.description and row.first.step == 3
    result = SuiteResult(rows=[row], cases=[row.case])
    text = render_text(result)
    assert f"FAIL {row.case} [off, class exact] - {case.description}" in text


def test_opposite_signs_have_no_ulp_count_and_huge_errors_are_shown_in_class_units():
    dev = compare([{"w": np.array([-1e-300, 2.0])}], [{"w": np.array([1e-300, 2.0])}], {"w": np.array([4.0])})
    assert dev.sign_flips == 1 and dev.max_ulp == 0.0 and ulp_cell(dev.max_ulp, dev.sign_flips) == "sign"
    case = CASES["huge_magnitudes.float64"]
    result = run_suite(backends=["torch DualOpt (fast path)"], cases=[case], only="open", progress=None)
    table = aggregate_table(result)
    header = table.splitlines()[0]
    assert header.startswith("verdict  worst err/tol  implementation")
    assert "abs" not in header and "e+0" not in table  # no raw absolute error next to the verdict


def test_json_is_strict_and_marks_non_finite_values(tmp_path):
    bad = ReplayImplementation(lambda c: [{n: a[:1] for n, a in s.items()} for s in replay_reference(c)], "short")
    result = run_suite(backends=["numpy"], cases=SMALL[:1], only="open", progress=None, extra=[bad])
    data = to_json(result)
    json.dumps(data, allow_nan=False)

    def strings_of_numbers(x):
        if isinstance(x, dict):
            return [v for k, val in x.items() if k != "nonfinite" for v in strings_of_numbers(val)]
        if isinstance(x, list):
            return [v for val in x for v in strings_of_numbers(val)]
        return [x] if x in ("inf", "-inf", "nan") else []

    assert strings_of_numbers(data) == []  # infinity lives only in the "nonfinite" flags
    row = next(r for r in data["rows"] if r["implementation"] == "short")
    assert row["err_over_tol"] is None and row["nonfinite"]["err_over_tol"] == "inf"
    assert row["scaled_error_per_step"][0] is None and row["nonfinite"]["scaled_error_per_step[0]"] == "inf"
    paths = write_report(result, tmp_path)
    json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert "## Failures (1)" in paths["markdown"].read_text()


def test_plot_has_a_panel_per_class_and_a_distinct_style_per_line():
    result = run_suite(backends=["numpy", "core[torch]"], cases=SMALL[:2], only="open", progress=None)
    assert [p[1] for p in _panels(result)] == ["exact", "torch"]
    styles = {line_style(i) for i in range(40)}
    assert len(styles) == 40


# ---- progress -------------------------------------------------------------------------------------------------------

class _Slow(ReplayImplementation):
    def replay_cases(self, cases):
        time.sleep(0.4)
        return super().replay_cases(cases)


def test_progress_shows_k_of_n_elapsed_and_eta_in_whole_lines_under_two_jobs():
    buf = io.StringIO()
    run_suite(backends=[], cases=SMALL, only="open", progress=buf, jobs=2, interval=0.3,
              extra=[_Slow(replay_reference, f"slow {i}") for i in range(3)])
    lines = buf.getvalue().splitlines()
    assert any(re.fullmatch(r"\[open\]   slow \d \(exact\): [1-2]/3 cases, \d+ s elapsed, ETA \d+ s", ln)
               for ln in lines), lines
    assert all(re.fullmatch(r"(dualopt conformance: .*|\[open\]   slow \d \(exact\): \d/3 cases.*)", ln)
               for ln in lines), lines


def test_a_selection_where_everything_is_skipped_is_a_setup_error(monkeypatch, capsys):
    from dualopt.conformance import __main__ as cli
    from dualopt.conformance.discovery import Entry

    gone = [Entry("core[numpy]", "core[numpy]", "impl_core", skip="numpy not installed")]
    monkeypatch.setattr(cli, "discover", lambda *a, **k: list(gone))
    assert cli.main(["--backends", "numpy", "--report", ""]) == 2
    err = capsys.readouterr().err
    assert "every selected implementation is skipped here" in err and "numpy not installed" in err

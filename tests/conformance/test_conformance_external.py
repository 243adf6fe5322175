"""The suite as outside implementers use it: a replay callable, the pytest entry point, the CLI.

A deliberately wrong implementation (the pull applied to theta instead of the
pre-weight, ``_conformance_wrong.py``) must be caught; the numpy core wrapped as
a plain function must pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dualopt.conformance.external import ReplayImplementation, check_case, pytest_suite, vector_paths
from dualopt.conformance.impl_core import replay_reference
from dualopt.spec.vectors import vector_files
from dualopt.conformance.runner import run_suite
from dualopt.spec.vectors import load_case, load_cases

from tests.conformance._conformance_wrong import replay_wrong

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CASES = {f"{c.name}.{c.dtype}": c for c in load_cases()}


def _env() -> dict[str, str]:
    # The wrong implementation is importable as a top-level module from this directory.
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                TF_CPP_MIN_LOG_LEVEL="2")


@pytest.mark.parametrize("cid", ["adam_finetune_p1.float64", "adam_scratch.float32", "sgd_finetune.float64",
                                 "mixed_groups.float64"])
def test_wrong_pull_is_caught_on_every_case_with_a_pull(cid):
    row = check_case(replay_wrong, CASES[cid], name="wrong pull")
    assert row.status == "FAIL"
    # Far outside even the loosest budget, not a rounding-level near miss.
    assert row.dev.max_scaled > 1e-6


def test_wrong_pull_is_invisible_without_a_pull():
    # With rho = 0 the pull is skipped: the wrong rule is the right one (a sanity check of the wrong impl itself).
    assert check_case(replay_wrong, CASES["adam_none.float64"], name="wrong pull").status == "exact"


def test_suite_fails_and_exits_nonzero_on_the_wrong_implementation():
    result = run_suite(backends=[], extra=[ReplayImplementation(replay_wrong, "wrong pull")], only="open",
                       progress=None)
    statuses = [r.status for r in result.rows]
    assert statuses.count("FAIL") >= len(statuses) - 4  # all but adam_none / sgd cases without a pull
    assert result.exit_code == 1


def test_correct_plain_function_passes_every_case():
    result = run_suite(backends=[], extra=[ReplayImplementation(replay_reference, "numpy core function")],
                       only="open", progress=None)
    assert len(result.rows) == len(CASES)
    assert {r.status for r in result.rows} == {"exact"} and result.exit_code == 0


def test_check_case_reports_a_crash_as_failure():
    def broken(case):
        raise RuntimeError("not implemented yet")

    row = check_case(broken, CASES["adam_none.float64"])
    assert row.status == "FAIL" and "not implemented yet" in row.note


def test_pytest_entry_point_in_an_outside_project(tmp_path):
    """pytest_suite() in someone else's test file: the right replay passes, the wrong one fails."""
    (tmp_path / "test_port.py").write_text(textwrap.dedent("""
        from dualopt.conformance.external import pytest_suite
        from dualopt.conformance.impl_core import replay_reference
        from _conformance_wrong import replay_wrong

        test_good = pytest_suite(replay_reference, "numpy port")
        test_wrong = pytest_suite(replay_wrong, "wrong port", dtypes=("float64",))
        test_partial = pytest_suite(replay_reference, "partial port", dtypes=("float32",),
                                    supports=lambda case: "nonfinite" not in case.features)
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_port.py")],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    out = proc.stdout
    n64 = len(vector_paths(dtypes=("float64",)))
    n_all = len(vector_paths())
    n32 = n_all - n64
    # wrong port: every float64 case with a non-zero pull fails; partial port: nonfinite_skip skipped.
    wrong_passing = sum(1 for c in CASES.values() if c.dtype == "float64" and
                        check_case(replay_wrong, c).status in ("exact", "pass"))
    failed = n64 - wrong_passing
    assert proc.returncode == 1, out
    assert f"{failed} failed, {n_all + wrong_passing + n32 - 1} passed, 1 skipped" in out, out
    assert "test_wrong[adam_scratch.float64]" in out and "FAIL" in out


def test_pytest_suite_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="numerics='approx' is invalid"):
        pytest_suite(replay_reference, "x", numerics="approx")
    with pytest.raises(ValueError, match="vectors_dir=.* is invalid"):
        pytest_suite(replay_reference, "x", vectors_dir=tmp_path)
    with pytest.raises(TypeError, match="replay=1 is invalid"):
        ReplayImplementation(1, "x")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dualopt.conformance", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)


def test_cli_core_backends_pass_and_write_the_report(tmp_path):
    proc = _cli("--backends", "numpy,array-api-strict", "--report", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr
    assert "== aggregate" in proc.stdout and "== open loop, adam_scratch.float64" in proc.stdout
    assert "dualopt conformance: PASS - 2 implementations" in proc.stdout
    # Progress goes to stderr: k/N cases per implementation, and the counts when it is done.
    n = len(vector_files())
    done = rf"\[open\]   core\[numpy\] \(exact\): {n}/{n} cases in [0-9.]+ s: {n} exact"
    assert re.search(done, proc.stderr), proc.stderr
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["conformance.json", "conformance.md",
                                                                      "conformance.png"]


def test_cli_exits_nonzero_on_a_wrong_external_replay(tmp_path):
    proc = _cli("--backends", "none", "--only", "open", "--dtype", "float64", "--quiet", "--report", "",
                "--replay", "_conformance_wrong:replay_wrong")
    assert proc.returncode == 1, proc.stderr
    assert "replay_wrong (_conformance_wrong)" in proc.stdout and "FAIL" in proc.stdout
    assert "== open loop" not in proc.stdout  # --quiet: aggregate only


def test_cli_rejects_bad_usage():
    proc = _cli("--replay", "no_colon_here")
    assert proc.returncode == 2 and "--replay='no_colon_here' is invalid" in proc.stderr
    proc = _cli("--dtype", "float16")
    assert proc.returncode == 2


def test_cli_list_shows_skipped_modules():
    proc = _cli("--list")
    assert proc.returncode == 0
    assert "core[numpy]" in proc.stdout and "available" in proc.stdout

"""The runner, discovery and report on small, fast inputs (numpy core plus fake implementations)."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import sys
import textwrap

import numpy as np
import pytest

from dualopt.conformance.discovery import discover, select, tokens
from dualopt.conformance.external import ReplayImplementation
from dualopt.conformance.impl_core import replay_reference
from dualopt.conformance.problem import make_problem
from dualopt.conformance.report import _environment, aggregate, render_text, summary_line, write_report
from dualopt.conformance.runner import run_suite
from dualopt.spec.vectors import load_cases

CASES = [c for c in load_cases() if c.name in ("adam_finetune_p1", "sgd_scratch", "missing_grads")]
PROBLEM = dataclasses.replace(make_problem(), epochs=3)


def _perturbed(case):
    """The reference trajectory with the largest element of the last step moved by 1e-3 relative.

    That is a scaled error of 1e-3, outside every open-loop budget in both dtypes.
    """
    traj = replay_reference(case)
    name = case.names[0]
    w = traj[-1][name].copy()
    w.reshape(-1)[np.argmax(np.abs(w))] *= 1 + 1e-3
    traj[-1][name] = w
    return traj


class Unavailable(ReplayImplementation):
    def unavailable(self):
        return "fakeframework not installed"


class Crashing(ReplayImplementation):
    def replay_cases(self, cases):
        raise RuntimeError("boom")


def _run(extra, **kw):
    return run_suite(backends=["numpy"], modules=["impl_core"], extra=extra, cases=CASES, problem=PROBLEM,
                     modes=("mixed", "none"), progress=None, **kw)


@pytest.fixture(scope="module")
def mixed_result():
    extra = [
        ReplayImplementation(replay_reference, "good external"),
        ReplayImplementation(_perturbed, "off by 1e-3", numerics="torch"),
        ReplayImplementation(replay_reference, "no missing grads", supports=lambda c: "missing_grads" not in c.features),
        Unavailable(replay_reference, "not installed here"),
        Crashing(replay_reference, "crashes"),
    ]
    return _run(extra)


def test_statuses_per_implementation(mixed_result):
    by = {(r.impl, r.case): r for r in mixed_result.rows}
    ids = [f"{c.name}.{c.dtype}" for c in CASES]
    assert all(by[("core[numpy]", i)].status == "exact" for i in ids)
    assert all(by[("good external", i)].status == "exact" for i in ids)
    assert all(by[("off by 1e-3", i)].status == "FAIL" for i in ids)
    assert {by[("no missing grads", i)].status for i in ids if i.startswith("missing")} == {"n/a"}
    assert all(by[("not installed here", i)].status == "skipped" for i in ids)
    assert all(by[("not installed here", i)].note == "fakeframework not installed" for i in ids)
    crash = by[("crashes", ids[0])]
    assert crash.status == "FAIL" and "RuntimeError: boom" in crash.note
    # The closed loop: core[numpy] reproduces its own reference; the externals have none.
    assert by[("core[numpy]", "closed:mixed")].status == "exact"
    assert not any(r.loop == "closed" and r.impl == "good external" for r in mixed_result.rows)
    assert mixed_result.exit_code == 1


def test_aggregate_and_summary(mixed_result):
    agg = {a["implementation"]: a for a in aggregate(mixed_result)}
    assert agg["core[numpy]"]["verdict"] == "exact"
    assert agg["core[numpy]"]["counts"]["open"]["exact"] == len(CASES)
    assert agg["off by 1e-3"]["verdict"] == "FAIL"
    assert agg["off by 1e-3"]["worst_ratio"] > 1
    assert agg["not installed here"]["verdict"] == "skipped"
    assert agg["no missing grads"]["verdict"] == "exact"
    assert agg["no missing grads"]["counts"]["open"]["n/a"] == 2
    line = summary_line(mixed_result)
    assert line.startswith("dualopt conformance: FAIL") and "1 skipped" in line
    text = render_text(mixed_result)
    assert "== open loop, adam_finetune_p1.float64" in text and "== aggregate" in text
    assert "SKIPPED" in text and text.rstrip().endswith(line)


def test_a_correct_external_callable_passes():
    result = _run([ReplayImplementation(replay_reference, "numpy core as a plain function")])
    assert result.exit_code == 0
    assert {r.status for r in result.rows if r.impl == "numpy core as a plain function"} == {"exact"}


def test_report_files(mixed_result, tmp_path):
    paths = write_report(mixed_result, tmp_path / "rep")
    data = json.loads(paths["json"].read_text())
    assert data["verdict"] == "FAIL" and data["exit_code"] == 1
    assert len(data["rows"]) == len(mixed_result.rows)
    row = next(r for r in data["rows"] if r["implementation"] == "off by 1e-3")
    assert row["status"] == "FAIL" and len(row["scaled_error_per_step"]) == row["steps"]
    assert row["tolerance"]["per_step"] is True and row["tolerance"]["reason"]
    assert {p["class"] for p in data["policy"]} >= {"exact", "torch", "xla-jit"}
    md = paths["markdown"].read_text()
    assert "## Aggregate" in md and "| off by 1e-3 |" in md and "conformance.png" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_discovery_skips_missing_and_unimportable_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "fakeconf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "impl_ok.py").write_text(textwrap.dedent("""
        from dualopt.conformance.external import ReplayImplementation
        from dualopt.conformance.impl_core import replay_reference
        def implementations():
            return [ReplayImplementation(replay_reference, "ok impl", framework="fake[numpy]")]
    """))
    (pkg / "impl_needs_fw.py").write_text("import nonexistent_framework_xyz\n")
    (pkg / "impl_broken.py").write_text("raise RuntimeError('broken at import')\n")
    (pkg / "impl_bad_list.py").write_text("def implementations():\n    raise ValueError('nope')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = {e.module: e for e in discover(["impl_ok", "impl_needs_fw", "impl_broken", "impl_absent",
                                              "impl_bad_list"], package="fakeconf")}
    assert entries["impl_ok"].impl is not None and entries["impl_ok"].name == "ok impl"
    assert entries["impl_needs_fw"].skip == "nonexistent_framework_xyz not installed"
    assert "not found" in entries["impl_absent"].skip
    assert "broken at import" in entries["impl_broken"].error
    assert "nope" in entries["impl_bad_list"].error
    result = run_suite(modules=["impl_ok", "impl_needs_fw", "impl_absent", "impl_broken"], package="fakeconf",
                       cases=CASES[:1], only="open", progress=None)
    status = {r.impl: r.status for r in result.rows}
    assert status == {"ok impl": "exact", "needs_fw (all)": "skipped", "absent (all)": "skipped",
                      "broken (all)": "FAIL"}
    assert result.exit_code == 1
    for name in [m for m in sys.modules if m == "fakeconf" or m.startswith("fakeconf.")]:
        del sys.modules[name]


def test_backend_filter_tokens():
    assert tokens("keras[tensorflow]") >= {"keras", "tensorflow", "keras[tensorflow]"}
    es = discover(["impl_core"])
    assert [e.name for e in select(es, ["torch"])] == ["core[torch]"]
    assert [e.name for e in select(es, ["core[jax]"])] == ["core[jax]", "core[jax, jit]"]
    assert [e.name for e in select(es, ["core[jax, jit]"])] == ["core[jax, jit]"]  # an implementation's name
    assert {e.name for e in select(es, ["jax"])} == {"core[jax]", "core[jax, jit]"}
    assert select(es, ["nothing-like-this"]) == []
    assert len(select(es, None)) == len(es)


def test_dtype_selection_and_open_only():
    result = run_suite(backends=["numpy"], modules=["impl_core"], dtypes=["float32"], only="open", progress=None)
    assert result.rows and {r.dtype for r in result.rows} == {"float32"}
    assert not result.closed_cases
    assert np.isfinite(result.wall_s)


def test_report_environment_finds_tensorflow_under_its_cpu_distribution_name():
    installed = {}
    for dist in ("tensorflow", "tensorflow-cpu"):
        try:
            installed[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    env = _environment()
    if not installed:
        assert env["tensorflow"] == "not installed"
    else:
        assert env["tensorflow"] == next(iter(installed.values()))
    assert env["numpy"] == md.version("numpy")

"""Tables, the aggregate, and the saved report (markdown, JSON, PNG) of a suite run."""

from __future__ import annotations

import json
import math
import platform
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .runner import CLOSED_PREFIX, Row, SuiteResult
from .tolerances import CLASSES, OPEN, CLOSED, policy_table

__all__ = ["case_table", "aggregate", "aggregate_table", "summary_line", "render_text", "write_report",
           "format_table", "fmt"]

SCHEMA = "dualopt-conformance-report/1"


def fmt(x: float | None, kind: str = "e") -> str:
    """Compact number: '0' for zero, '-' for missing, 'inf' for infinite.

    Examples
    --------
    >>> fmt(0.0), fmt(None), fmt(float("inf")), fmt(3.0e-16), fmt(12.0, "int"), fmt(0.25, "ratio")
    ('0', '-', 'inf', '3.0e-16', '12', '0.25')
    """
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    if kind == "int":
        return f"{x:.0f}"
    if kind == "ratio":
        return f"{x:.2g}"
    return f"{x:.1e}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, markdown: bool = False) -> str:
    """A fixed-width text table, or a GitHub markdown table.

    Examples
    --------
    >>> print(format_table(["a", "bb"], [["1", "2"]]))
    a  bb
    -  --
    1  2
    """
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


CASE_HEADERS = ["implementation", "class", "max abs err", "max rel err", "max ulp", "err/tol", "tolerance", "steps",
                "dtype", "verdict", "note"]


def _steps(r: Row) -> str:
    return f"{r.steps} ep" if r.loop == "closed" else str(r.steps)


def _case_cells(r: Row, note_width: int | None) -> list[str]:
    d = r.dev
    note = r.note if note_width is None or len(r.note) <= note_width else r.note[: note_width - 3] + "..."
    tol = "-" if r.tol is None else r.tol.describe()
    ratio = "-" if d is None else fmt(r.ratio, "ratio")
    return [r.impl, r.numerics, fmt(d.max_abs if d else None), fmt(d.max_rel if d else None),
            fmt(d.max_ulp if d else None, "int"), ratio, tol, _steps(r), r.dtype,
            r.status.upper() if r.status == "skipped" else r.status, note]


def _title(case: str) -> str:
    if case == CLOSED_PREFIX + "none":
        return "closed loop, mode none (rho = 0): DualOpt and the frameworks' own Adam vs core[numpy]"
    if case.startswith(CLOSED_PREFIX):
        return f"closed loop, mode {case[len(CLOSED_PREFIX):]}: weights after every epoch vs core[numpy]"
    return f"open loop, {case}: replay vs spec/vectors/{case}.json"


def case_table(rows: Sequence[Row], case: str, *, markdown: bool = False, note_width: int | None = 60) -> str:
    """The table of one case: one row per implementation."""
    sel = [r for r in rows if r.case == case]
    return format_table(CASE_HEADERS, [_case_cells(r, note_width) for r in sel], markdown=markdown)


def _worst(values: Iterable[float]) -> float | None:
    vals = [v for v in values]
    return max(vals) if vals else None


def aggregate(result: SuiteResult) -> list[dict[str, Any]]:
    """One record per implementation across all cases."""
    by_impl: dict[str, list[Row]] = defaultdict(list)
    for r in result.rows:
        by_impl[r.impl].append(r)
    out = []
    for entry in result.entries:
        rows = by_impl.get(entry.name, [])
        measured = [r for r in rows if r.dev is not None]
        counts = {loop: {s: sum(r.status == s for r in rows if r.loop == loop)
                         for s in ("exact", "pass", "FAIL", "n/a", "skipped")} for loop in ("open", "closed")}
        statuses = {r.status for r in rows}
        if "FAIL" in statuses:
            verdict = "FAIL"
        elif not rows or statuses <= {"skipped", "n/a"}:
            verdict = "skipped" if "skipped" in statuses or entry.skip else "n/a"
        elif statuses & {"exact", "pass"} == {"exact"}:
            verdict = "exact"
        else:
            verdict = "pass"
        out.append(dict(
            implementation=entry.name, framework=entry.framework, module=entry.module,
            numerics=rows[0].numerics if rows else "-", counts=counts,
            worst_abs=_worst(r.dev.max_abs for r in measured), worst_rel=_worst(r.dev.max_rel for r in measured),
            worst_ulp=_worst(r.dev.max_ulp for r in measured),
            worst_ratio=_worst(r.ratio for r in measured if r.status != "exact"),
            verdict=verdict, note=entry.skip or entry.error or ""))
    return out


def _count_cell(c: dict[str, int]) -> str:
    ran = c["exact"] + c["pass"] + c["FAIL"]
    if not ran and not c["n/a"] and not c["skipped"]:
        return "-"
    if not ran:
        return "skipped" if c["skipped"] else f"{c['n/a']} n/a"
    s = f"{c['exact']}/{c['pass']}/{c['FAIL']}"
    return s + (f" +{c['n/a']} n/a" if c["n/a"] else "")


AGG_HEADERS = ["implementation", "class", "open exact/pass/FAIL", "closed exact/pass/FAIL", "worst abs err",
               "worst rel err", "worst ulp", "worst err/tol", "verdict", "note"]


def aggregate_table(result: SuiteResult, *, markdown: bool = False, note_width: int | None = 50) -> str:
    cells = []
    for a in aggregate(result):
        note = a["note"]
        if note_width is not None and len(note) > note_width:
            note = note[: note_width - 3] + "..."
        cells.append([a["implementation"], a["numerics"], _count_cell(a["counts"]["open"]),
                      _count_cell(a["counts"]["closed"]), fmt(a["worst_abs"]), fmt(a["worst_rel"]),
                      fmt(a["worst_ulp"], "int"), fmt(a["worst_ratio"], "ratio"),
                      a["verdict"].upper() if a["verdict"] == "skipped" else a["verdict"], note])
    return format_table(AGG_HEADERS, cells, markdown=markdown)


def summary_line(result: SuiteResult) -> str:
    """One line: implementations, row counts per status, wall time, overall verdict."""
    agg = aggregate(result)
    n_skip = sum(a["verdict"] == "skipped" for a in agg)
    n_fail = sum(a["verdict"] == "FAIL" for a in agg)
    counts = {s: sum(r.status == s for r in result.rows) for s in ("exact", "pass", "FAIL", "n/a", "skipped")}
    verdict = "FAIL" if result.failed else "PASS"
    return (f"dualopt conformance: {verdict} - {len(agg)} implementations ({n_fail} failing, {n_skip} skipped); "
            f"rows: {counts['exact']} exact, {counts['pass']} pass, {counts['FAIL']} FAIL, {counts['n/a']} n/a, "
            f"{counts['skipped']} skipped; wall {result.wall_s:.1f} s")


def _all_cases(result: SuiteResult) -> list[str]:
    return list(result.cases) + list(result.closed_cases)


def render_text(result: SuiteResult, *, per_case: bool = True) -> str:
    """Everything printed on stdout: per-case tables (optional), the aggregate, the summary line."""
    parts = []
    if per_case:
        for case in _all_cases(result):
            if any(r.case == case for r in result.rows):
                parts.append(f"== {_title(case)}\n{case_table(result.rows, case)}\n")
    parts.append(f"== aggregate: one row per implementation (counts are cases: exact/pass/FAIL)\n"
                 f"{aggregate_table(result)}\n")
    parts.append(summary_line(result))
    return "\n".join(parts)


def _environment() -> dict[str, str]:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "machine": platform.machine(), "system": platform.system()}
    # tensorflow ships under several distribution names (tensorflow-cpu on these machines): the first found counts.
    for name, dists in (("numpy", ("numpy",)), ("torch", ("torch",)), ("jax", ("jax",)), ("jaxlib", ("jaxlib",)),
                        ("optax", ("optax",)), ("keras", ("keras",)),
                        ("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly")),
                        ("array-api-strict", ("array-api-strict",)), ("array-api-compat", ("array-api-compat",))):
        env[name] = "not installed"
        for dist in dists:
            try:
                env[name] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return env


def _row_json(r: Row) -> dict[str, Any]:
    d = r.dev

    def num(x: float) -> float | str:
        return x if math.isfinite(x) else str(x)

    return dict(loop=r.loop, case=r.case, implementation=r.impl, framework=r.framework, numerics=r.numerics,
                dtype=r.dtype, steps=r.steps, status=r.status, note=r.note,
                tolerance=None if r.tol is None else dict(budget=r.tol.budget, per_step=r.tol.per_step,
                                                          reason=r.tol.reason),
                err_over_tol=num(r.ratio),
                max_abs=None if d is None else num(d.max_abs), max_rel=None if d is None else num(d.max_rel),
                max_ulp=None if d is None else num(d.max_ulp),
                scaled_error_per_step=None if d is None else [num(x) for x in d.scaled],
                problems=[] if d is None else d.problems)


def to_json(result: SuiteResult) -> dict[str, Any]:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return x

    return dict(schema=SCHEMA, verdict="FAIL" if result.failed else "PASS", exit_code=result.exit_code,
                summary=summary_line(result), wall_s=result.wall_s, config=result.config,
                environment=_environment(), timings_s=result.timings,
                classes=CLASSES, policy=policy_table(),
                implementations=[dict(name=e.name, framework=e.framework, module=e.module, skip=e.skip, error=e.error)
                                 for e in result.entries],
                aggregate=[clean(a) for a in aggregate(result)], rows=[_row_json(r) for r in result.rows])


def render_markdown(result: SuiteResult, plot_name: str | None) -> str:
    lines = ["# DualOpt conformance report", "", f"**{summary_line(result)}**", ""]
    env = _environment()
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += ["Tolerance policy: `spec/TOLERANCES.md`. *err/tol* is the worst scaled error (max |got - ref| over a "
              "tensor divided by the largest magnitude that tensor has held) over the allowed one; `x t` budgets "
              "grow with the step number t. `exact` = bitwise identical (0 ulp).", ""]
    if plot_name:
        lines += [f"![deviation per step and epoch]({plot_name})", ""]
    lines += ["## Aggregate", "", aggregate_table(result, markdown=True, note_width=None), ""]
    lines += ["## Policy", "", format_table(["class", "loop", "dtype", "tolerance", "reason"],
                                            [list(p.values()) for p in policy_table()], markdown=True), ""]
    lines += ["## Per case", ""]
    for case in _all_cases(result):
        if any(r.case == case for r in result.rows):
            lines += [f"### {_title(case)}", "", case_table(result.rows, case, markdown=True, note_width=None), ""]
    return "\n".join(lines)


def _series(result: SuiteResult, loop: str, key: str) -> dict[str, list[float]]:
    """impl -> per step (or epoch) worst scaled error over the cases selected by ``key``."""
    out: dict[str, list[float]] = {}
    for r in result.rows:
        if r.loop != loop or r.dev is None:
            continue
        if (loop == "open" and r.dtype != key) or (loop == "closed" and r.case != CLOSED_PREFIX + key):
            continue
        cur = out.setdefault(r.impl, [])
        for t, v in enumerate(r.dev.scaled):
            if t < len(cur):
                cur[t] = max(cur[t], v)
            else:
                cur.append(v)
    return out


def write_plot(result: SuiteResult, path: Path) -> Path | None:
    """Deviation per step (open loop, per dtype) and per epoch (closed loop, per mode), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, str]] = []
    for dt in ("float64", "float32"):
        if any(r.loop == "open" and r.dtype == dt and r.dev is not None for r in result.rows):
            panels.append(("open", dt, f"open loop, {dt}: worst over vectors"))
    for case in result.closed_cases:
        mode = case[len(CLOSED_PREFIX):]
        if any(r.case == case and r.dev is not None for r in result.rows):
            panels.append(("closed", mode, f"closed loop, mode {mode}"))
    if not panels:
        return None
    impls = [e.name for e in result.entries]
    # Up to ~20 lines per panel: ten colours times two line styles keep them apart.
    cmap = plt.get_cmap("tab10")
    style = {n: dict(color=cmap(i % 10), ls="-" if (i // 10) % 2 == 0 else "-.", marker="os^vD<>p*h"[i % 10])
             for i, n in enumerate(impls)}
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.2 * nrow), squeeze=False)
    for ax, (loop, key, title) in zip(axes.flat, panels):
        eps = float(np.finfo(key).eps) if loop == "open" else float(np.finfo(np.float64).eps)
        floor = eps * 1e-3  # exact (0) is drawn here: a log axis has no zero
        series = _series(result, loop, key)
        for name, ys in series.items():
            x = np.arange(1, len(ys) + 1)
            y = np.maximum(np.asarray(ys, dtype=float), floor)
            st = style.get(name, {})
            ax.plot(x, y, ms=3, lw=1.1, label=name, alpha=0.85, **st)
        budgets = {OPEN[k].budget for k in OPEN if k[1] == key and OPEN[k].budget} if loop == "open" else \
            {t.budget for t in CLOSED.values()}
        steps = max((len(v) for v in series.values()), default=1)
        for b in sorted(budgets):
            xs = np.arange(1, steps + 1)
            ax.plot(xs, b * xs if loop == "open" else np.full(steps, b), ls="--", lw=0.8, color="grey")
        ax.axhline(floor, color="black", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step" if loop == "open" else "epoch")
        ax.set_ylabel("scaled error (dotted: exact = 0; dashed: tolerance)", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(5, max(1, len(handles))),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(handles) / 5), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: SuiteResult, directory: str | Path) -> dict[str, Path]:
    """Write ``conformance.md``, ``conformance.json`` and ``conformance.png`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "conformance.json", "markdown": d / "conformance.md"}
    png = write_plot(result, d / "conformance.png")
    if png is not None:
        paths["png"] = png
    paths["json"].write_text(json.dumps(to_json(result), indent=1) + "\n")
    paths["markdown"].write_text(render_markdown(result, png.name if png else None) + "\n")
    return paths

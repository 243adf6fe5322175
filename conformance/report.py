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
from .tolerances import CLASSES, class_error, policy_table, tolerance

__all__ = ["case_table", "aggregate", "aggregate_table", "failures", "summary_line", "render_text", "write_report",
           "format_table", "fmt", "to_json", "ulp_cell", "class_error_cell"]

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


CASE_HEADERS = ["verdict", "err/tol", "error (class units)", "tolerance", "implementation", "class", "max abs err",
                "max rel err", "max ulp", "steps", "dtype", "note"]


def _steps(r: Row) -> str:
    return f"{r.steps} ep" if r.loop == "closed" else str(r.steps)


def ulp_cell(ulp: float | None, sign_flips: int) -> str:
    """The ulp column: a count, or ``sign`` where values of opposite sign make a count meaningless.

    Examples
    --------
    >>> ulp_cell(3.0, 0), ulp_cell(0.0, 2), ulp_cell(12.0, 1), ulp_cell(None, 0)
    ('3', 'sign', '12 +sign', '-')
    """
    if ulp is None:
        return "-"
    if sign_flips:
        return "sign" if ulp == 0 else f"{fmt(ulp, 'int')} +sign"
    return fmt(ulp, "int")


def class_error_cell(value: float | None, unit: str, sign_flips: int = 0) -> str:
    """An error in the units its class is judged in: ``3 ulp``, ``0.52 eps x t``, ``2.2e-15`` (scaled).

    Examples
    --------
    >>> class_error_cell(2.0, "ulp"), class_error_cell(0.5, "eps x t"), class_error_cell(2.2e-15, "")
    ('2 ulp', '0.5 eps x t', '2.2e-15')
    >>> class_error_cell(7.0, "ulp", sign_flips=3), class_error_cell(0.0, "ulp", sign_flips=3)
    ('7 ulp +sign', 'sign')
    """
    if value is None:
        return "-"
    if unit == "ulp":
        if sign_flips:
            return "sign" if value == 0 else f"{fmt(value, 'int')} ulp +sign"
        return f"{fmt(value, 'int')} ulp"
    if unit:
        return f"{fmt(value, 'ratio')} {unit}"
    return fmt(value)


def _class_error(r: Row) -> tuple[float | None, str]:
    if r.dev is None or r.tol is None or r.dev.problems:
        return None, ""
    return class_error(r.dev, r.tol)


def _case_cells(r: Row, note_width: int | None) -> list[str]:
    d = r.dev
    note = r.note if note_width is None or len(r.note) <= note_width else r.note[: note_width - 3] + "..."
    tol = "-" if r.tol is None else r.tol.describe()
    ratio = "-" if d is None else fmt(r.ratio, "ratio")
    value, unit = _class_error(r)
    return [r.status.upper() if r.status == "skipped" else r.status, ratio,
            class_error_cell(value, unit, d.sign_flips if d else 0), tol, r.impl, r.numerics,
            fmt(d.max_abs if d else None), fmt(d.max_rel if d else None),
            ulp_cell(d.max_ulp if d else None, d.sign_flips if d else 0), _steps(r), r.dtype, note]


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


def _worst_class_error(rows: Sequence[Row]) -> tuple[float | None, str, int]:
    """The worst class-unit error over rows that share a unit (a class has one unit per loop)."""
    vals = [(_class_error(r), r.dev.sign_flips if r.dev else 0) for r in rows]
    vals = [(v, u, f) for (v, u), f in vals if v is not None]
    if not vals:
        return None, "", 0
    return max(v for v, _, _ in vals), vals[0][1], sum(f for _, _, f in vals)


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
        errs = {}
        for loop in ("open", "closed"):
            value, unit, flips = _worst_class_error([r for r in measured if r.loop == loop])
            errs[loop] = dict(value=value, unit=unit, sign_flips=flips)
        out.append(dict(
            implementation=entry.name, framework=entry.framework, module=entry.module,
            numerics=rows[0].numerics if rows else "-", counts=counts,
            worst_class_error=errs,
            worst_abs=_worst(r.dev.max_abs for r in measured), worst_rel=_worst(r.dev.max_rel for r in measured),
            worst_ulp=_worst(r.dev.max_ulp for r in measured),
            sign_flips=sum(r.dev.sign_flips for r in measured),
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


AGG_HEADERS = ["verdict", "worst err/tol", "implementation", "class", "open exact/pass/FAIL", "open worst err",
               "closed exact/pass/FAIL", "closed worst err", "note"]


def aggregate_table(result: SuiteResult, *, markdown: bool = False, note_width: int | None = 50) -> str:
    """One row per implementation; errors in the units its class is judged in (ulp, eps x t, scaled)."""
    cells = []
    for a in aggregate(result):
        note = a["note"]
        if note_width is not None and len(note) > note_width:
            note = note[: note_width - 3] + "..."
        err = {loop: class_error_cell(e["value"], e["unit"], e["sign_flips"])
               for loop, e in a["worst_class_error"].items()}
        cells.append([a["verdict"].upper() if a["verdict"] == "skipped" else a["verdict"],
                      fmt(a["worst_ratio"], "ratio"), a["implementation"], a["numerics"],
                      _count_cell(a["counts"]["open"]), err["open"], _count_cell(a["counts"]["closed"]),
                      err["closed"], note])
    return format_table(AGG_HEADERS, cells, markdown=markdown)


def failures(result: SuiteResult) -> list[str]:
    """One entry per failed comparison: case, what it tests, implementation and class, then where it failed."""
    out = []
    for r in result.rows:
        if r.failed:
            what = f" - {r.description}" if r.description else ""
            out.append(f"FAIL {r.case} [{r.impl}, class {r.numerics}]{what}\n    {r.note}")
    return out


def summary_line(result: SuiteResult) -> str:
    """One line: implementations, row counts per status, wall time, overall verdict."""
    agg = aggregate(result)
    n_skip = sum(a["verdict"] == "skipped" for a in agg)
    n_fail = sum(a["verdict"] == "FAIL" for a in agg)
    counts = {s: sum(r.status == s for r in result.rows) for s in ("exact", "pass", "FAIL", "n/a", "skipped")}
    verdict = result.verdict
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
    fails = failures(result)
    if fails:
        shown = fails[:30] + ([f"... and {len(fails) - 30} more (see the report)"] if len(fails) > 30 else [])
        parts.append(f"== failures ({len(fails)}): first step outside the tolerance, worst element there\n"
                     + "\n".join(shown) + "\n")
    parts.append(f"== aggregate: one row per implementation (counts are cases: exact/pass/FAIL; errors in each "
                 f"class's units: ulp for a bitwise class, eps x t for a per-step budget, scaled error in the "
                 f"closed loop)\n{aggregate_table(result)}\n")
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


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by null and recorded under ``"nonfinite"``.

    JSON has no infinity or NaN, so the encoding is: the field holds ``null``
    and the nearest enclosing object's ``"nonfinite"`` maps the field's name
    (``"name[i]"`` for a list element) to ``"inf"``, ``"-inf"`` or ``"nan"``.

    Examples
    --------
    >>> finite_json({"a": float("inf"), "b": [1.0, float("nan")], "c": 2})
    {'a': None, 'b': [1.0, None], 'c': 2, 'nonfinite': {'a': 'inf', 'b[1]': 'nan'}}
    """
    def walk(x: Any, name: str, flags: dict[str, str]) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            flags[name] = str(x)
            return None
        if isinstance(x, dict):
            inner: dict[str, str] = {}
            out = {k: walk(v, str(k), inner) for k, v in x.items()}
            if inner:
                out["nonfinite"] = inner
            return out
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{name}[{i}]", flags) for i, v in enumerate(x)]
        if isinstance(x, np.generic):
            return walk(x.item(), name, flags)
        return x

    return walk(obj, "", {})


def _row_json(r: Row) -> dict[str, Any]:
    d = r.dev
    value, unit = _class_error(r)
    return dict(loop=r.loop, case=r.case, description=r.description, implementation=r.impl,
                framework=r.framework, numerics=r.numerics, dtype=r.dtype, steps=r.steps, status=r.status,
                note=r.note, first_failure=None if r.first is None else r.first.to_json(),
                tolerance=None if r.tol is None else dict(budget=r.tol.budget, per_step=r.tol.per_step,
                                                          describe=r.tol.describe(), reason=r.tol.reason),
                err_over_tol=None if d is None else r.ratio,
                class_error=None if value is None else dict(value=value, unit=unit or "scaled"),
                max_abs=None if d is None else d.max_abs, max_rel=None if d is None else d.max_rel,
                max_ulp=None if d is None else d.max_ulp, sign_flips=None if d is None else d.sign_flips,
                scaled_error_per_step=None if d is None else list(d.scaled),
                problems=[] if d is None else d.problems)


def to_json(result: SuiteResult) -> dict[str, Any]:
    """The whole run as strict JSON data (no NaN or infinity: see :func:`finite_json`)."""
    return finite_json(dict(
        schema=SCHEMA, verdict=result.verdict, exit_code=result.exit_code,
        summary=summary_line(result), wall_s=result.wall_s, config=result.config,
        environment=_environment(), timings_s=result.timings,
        classes=CLASSES, policy=policy_table(),
        implementations=[dict(name=e.name, framework=e.framework, module=e.module, skip=e.skip, error=e.error)
                         for e in result.entries],
        aggregate=aggregate(result), rows=[_row_json(r) for r in result.rows]))


def render_markdown(result: SuiteResult, plot_name: str | None) -> str:
    lines = ["# DualOpt conformance report", "", f"**{summary_line(result)}**", ""]
    env = _environment()
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += ["Tolerance policy: `spec/TOLERANCES.md`. *err/tol* is the worst scaled error (max |got - ref| over a "
              "tensor divided by the largest magnitude that tensor has held) over the allowed one; `x t` budgets "
              "grow with the step number t. `exact` = bitwise identical (0 ulp).", ""]
    if plot_name:
        lines += [f"![deviation per step and epoch, one panel per class]({plot_name})", ""]
    lines += ["## Aggregate", "", aggregate_table(result, markdown=True, note_width=None), ""]
    fails = failures(result)
    if fails:
        lines += [f"## Failures ({len(fails)})", ""]
        for f in fails:
            head, _, note = f.partition("\n    ")
            lines += [f"- **{head}**  ", f"  {note}"]
        lines += [""]
    lines += ["## Policy", "", format_table(["class", "loop", "dtype", "tolerance", "reason"],
                                            [list(p.values()) for p in policy_table()], markdown=True), ""]
    lines += ["## Per case", ""]
    for case in _all_cases(result):
        if any(r.case == case for r in result.rows):
            lines += [f"### {_title(case)}", "", case_table(result.rows, case, markdown=True, note_width=None), ""]
    return "\n".join(lines)


def _panels(result: SuiteResult) -> list[tuple[str, str, str]]:
    """(loop, class, dtype) for every panel: open loop per class and dtype, closed loop per class."""
    keys: dict[tuple[str, str, str], None] = {}
    for r in result.rows:
        if r.dev is not None and r.numerics != "-":
            keys[(r.loop, r.numerics, r.dtype)] = None
    order = {c: i for i, c in enumerate(CLASSES)}
    return sorted(keys, key=lambda k: (k[0] != "open", order.get(k[1], 99), k[2] != "float64"))


def _series(result: SuiteResult, loop: str, cls: str, dtype: str) -> dict[str, list[float]]:
    """impl -> per step (or epoch) worst scaled error over that panel's cases."""
    out: dict[str, list[float]] = {}
    for r in result.rows:
        if r.loop != loop or r.dev is None or r.numerics != cls or r.dtype != dtype:
            continue
        cur = out.setdefault(r.impl, [])
        for t, v in enumerate(r.dev.scaled):
            if t < len(cur):
                cur[t] = max(cur[t], v)
            else:
                cur.append(v)
    return out


#: Line styles: with ten colours, (colour, style) pairs separate 40 implementations; markers add a third cue.
_STYLES = ("-", "--", "-.", ":")
_MARKERS = "os^vD<>p*hXP"


def line_style(i: int) -> tuple[int, str, str]:
    """(tab10 colour index, line style, marker) of the i-th implementation: distinct for 40 lines.

    Examples
    --------
    >>> line_style(0), line_style(10), line_style(21)
    ((0, '-', 'o'), (0, '--', 'X'), (1, '-.', 'h'))
    """
    return i % 10, _STYLES[(i // 10) % len(_STYLES)], _MARKERS[i % len(_MARKERS)]


def write_plot(result: SuiteResult, path: Path) -> Path | None:
    """Scaled error per step (open loop) or epoch (closed loop), one panel per numerics class (and dtype).

    Each panel shows only its class's implementations and its class's budget,
    labelled; a bitwise class has a zero budget, drawn as the 'exact' floor.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(result)
    if not panels:
        return None
    impls = [e.name for e in result.entries]
    cmap = plt.get_cmap("tab10")
    style = {}
    for i, n in enumerate(impls):
        colour, ls, marker = line_style(i)
        style[n] = dict(color=cmap(colour), ls=ls, marker=marker)
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 5.0 * nrow), squeeze=False)
    for ax, (loop, cls, dtype) in zip(axes.flat, panels):
        eps = float(np.finfo(dtype).eps)
        floor = eps * 1e-3  # exact (0) is drawn here: a log axis has no zero
        series = _series(result, loop, cls, dtype)
        steps = max((len(v) for v in series.values()), default=1)
        xs = np.arange(1, steps + 1)
        for name, ys in series.items():
            y = np.maximum(np.asarray(ys, dtype=float), floor)
            ax.plot(np.arange(1, len(ys) + 1), y, ms=3, lw=1.1, label=name, alpha=0.85, markevery=max(1, len(ys) // 12),
                    **style.get(name, {}))
        tol = tolerance(cls, loop, dtype)
        if tol.bitwise:
            ax.plot(xs, np.full(steps, floor), color="black", lw=1.0, ls=":", label="budget: bitwise (0), drawn at "
                                                                                  "the exact floor")
        else:
            ax.plot(xs, tol.budget * xs if tol.per_step else np.full(steps, tol.budget), color="black", lw=1.2,
                    ls=(0, (6, 3)), label=f"budget: {tol.describe()}")
            ax.axhline(floor, color="grey", lw=0.5, ls=":", label="exact (0)")
        ax.set_yscale("log")
        # Room for the budget and every line; a panel of exact lines alone still shows a few decades above them.
        top = max([floor * 1e4, *(v for ys in series.values() for v in ys if np.isfinite(v)),
                   float(tol.budget * steps if tol.per_step else tol.budget)])
        ax.set_ylim(floor / 3, top * 3)
        where = "open loop" if loop == "open" else "closed loop (worst over modes)"
        ax.set_title(f"class {cls}, {where}, {dtype}", fontsize=10)
        ax.set_xlabel("step" if loop == "open" else "epoch")
        ax.set_ylabel("scaled error (worst over cases)", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2, frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
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
    paths["json"].write_text(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(render_markdown(result, png.name if png else None) + "\n")
    return paths

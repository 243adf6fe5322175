"""Run every benchmark, each in its own process, and collect the figures: the one command.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run_all.py              # full set, ~30 min on a 2-core CPU
    .venv/bin/python benchmarks/run_all.py --tiny       # smoke run, about a minute
    .venv/bin/python benchmarks/run_all.py --publish    # also copy tables and PNGs to benchmarks/figures/

Parts, in order (``--only`` picks some):

- ``floor``: ``floor_memory.py`` (step cost vs hand-written OLOR, bandwidth floor, state memory)
- ``torch``, ``optax``, ``keras``: the per-adapter ``step_cost_<fw>.py`` scripts, when present
- ``whole``: ``whole_step.py`` (a whole training step of a 22 M-parameter encoder, default mode vs AdamW,
  in torch, Flax/optax and Keras on jax)
- ``finetune``: ``quality/finetune.py`` (fine-tuning and forgetting)
- ``scratch``: ``quality/scratch.py`` (from-scratch weight-decay sweep)

Each part's output is echoed and saved to ``<out>/<part>.txt``; a summary with
each part's wall time and exit status goes to ``<out>/summary.md``. A failing
part does not stop the others; the exit status is non-zero if any failed.

``--publish`` copies the tables (``*.md``, the parts' ``*.txt`` logs) and the
PNG figures to ``benchmarks/figures/`` (tracked by git; ``benchmarks/results/``
is ignored). It refuses ``--tiny``, whose figures are not results.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("floor", "torch", "optax", "keras", "whole", "finetune", "scratch")


def command(part: str, tiny: bool, out: Path) -> list[str] | None:
    """The argv of one part; None when its script does not exist, [] when it cannot run at tiny size."""
    t = ["--tiny"] if tiny else []
    if part == "floor":
        return [sys.executable, str(HERE / "floor_memory.py"), *t, "--out", str(out / "floor_memory.json")]
    if part == "whole":
        return [sys.executable, str(HERE / "whole_step.py"), *t]
    if part in ("finetune", "scratch"):
        return [sys.executable, "-m", f"benchmarks.quality.{part}", *t, "--out", str(out / "quality")]
    script = HERE / f"step_cost_{part}.py"
    if not script.exists():
        return None
    if tiny and '"--tiny"' not in script.read_text():
        return []  # the script has no smoke-size mode: a tiny run skips it
    return [sys.executable, str(script), *t]


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_part(part: str, argv: list[str], log: Path) -> tuple[int, float, float]:
    """Run one part, echoing and saving its output; (exit status, wall seconds, CPU seconds of its processes)."""
    t0, c0 = time.perf_counter(), _child_cpu()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=HERE.parent)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    return rc, time.perf_counter() - t0, _child_cpu() - c0


def machine() -> str:
    import torch

    return (f"{platform.platform()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def publish(out: Path, parts: list[str]) -> list[Path]:
    """Copy the final tables and figures (small files) of ``parts`` to benchmarks/figures/ for the README."""
    dest = HERE / "figures"
    dest.mkdir(exist_ok=True)
    q = out / "quality"
    quality = [q / f"{p}.{ext}" for p in ("finetune", "scratch") if p in parts for ext in ("md", "png")]
    copied = []
    summary = out / "summary.md"
    named = dest / ("summary.md" if set(parts) == set(PARTS) else f"summary_{'_'.join(parts)}.md")
    if summary.exists():
        shutil.copy2(summary, named)
        copied.append(named)
    for src in [*quality, *(out / f"{p}.txt" for p in parts)]:
        if src.exists():
            shutil.copy2(src, dest / src.name)
            copied.append(dest / src.name)
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run all DualOpt benchmarks.")
    ap.add_argument("--tiny", action="store_true", help="smoke-run sizes")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--publish", action="store_true", help="copy tables/figures to benchmarks/figures/")
    args = ap.parse_args(argv)
    if args.publish and args.tiny:
        ap.error("--publish copies results to benchmarks/figures/: not with --tiny (smoke-size figures)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    rows = []
    for part in PARTS:
        if part not in args.only:
            continue
        argv_part = command(part, args.tiny, args.out)
        if argv_part is None:
            print(f"\n===== {part}: benchmarks/step_cost_{part}.py not found, skipped =====\n", flush=True)
            rows.append((part, "not found", 0.0, 0.0, ""))
            continue
        if not argv_part:
            print(f"\n===== {part}: step_cost_{part}.py has no --tiny flag, skipped in a tiny run =====\n", flush=True)
            rows.append((part, "skipped (no --tiny)", 0.0, 0.0, ""))
            continue
        print(f"\n===== {part}: {' '.join(argv_part)} =====\n", flush=True)
        rc, dt, cpu = run_part(part, argv_part, args.out / f"{part}.txt")
        cmd = " ".join(Path(a).name if i < 2 else a for i, a in enumerate(argv_part))
        rows.append((part, "ok" if rc == 0 else f"FAILED (exit {rc})", dt, cpu, cmd))
    total = time.perf_counter() - t0
    lines = [f"# Benchmark run {started}{' (tiny)' if args.tiny else ''}", "", f"Machine: {machine()}", "",
             f"Load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min).", "",
             "| part | status | wall time | CPU time | command |", "|---|---|---:|---:|---|"]
    lines += [f"| {p} | {s} | {dt:.0f} s | {cpu:.0f} s | `{c}` |" for p, s, dt, cpu, c in rows]
    cpu_total = sum(r[3] for r in rows)
    lines += ["", f"Total wall time: {total:.0f} s ({total / 60:.1f} min); CPU time of the parts' processes "
              f"{cpu_total:.0f} s ({cpu_total / 60:.1f} min, user + system, all cores)."]
    summary = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary)
    if args.publish:
        for p in publish(args.out, [p for p in PARTS if p in args.only]):
            print(f"published {p.relative_to(HERE.parent)}")
    return 0 if all(r[1] in ("ok", "not found", "skipped (no --tiny)") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

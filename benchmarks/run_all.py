"""Run every benchmark, each in its own process, and collect the figures: the one command.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run_all.py              # full set, ~30 min on a 2-core CPU
    .venv/bin/python benchmarks/run_all.py --tiny       # smoke run, about a minute
    .venv/bin/python benchmarks/run_all.py --publish    # also copy tables and PNGs to benchmarks/figures/

Parts, in order (``--only`` picks some):

- ``floor``: ``floor_memory.py`` (step cost vs hand-written OLOR, bandwidth floor, state memory)
- ``torch``, ``optax``, ``keras``: the per-adapter ``step_cost_<fw>.py`` scripts, when present
- ``finetune``: ``quality/finetune.py`` (fine-tuning and forgetting)
- ``scratch``: ``quality/scratch.py`` (from-scratch weight-decay sweep)

Each part's output is echoed and saved to ``<out>/<part>.txt``; a summary with
each part's wall time and exit status goes to ``<out>/summary.md``. A failing
part does not stop the others; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("floor", "torch", "optax", "keras", "finetune", "scratch")


def command(part: str, tiny: bool, out: Path) -> list[str] | None:
    """The argv of one part; None when its script does not exist, [] when it cannot run at tiny size."""
    t = ["--tiny"] if tiny else []
    if part == "floor":
        return [sys.executable, str(HERE / "floor_memory.py"), *t, "--out", str(out / "floor_memory.json")]
    if part in ("finetune", "scratch"):
        return [sys.executable, str(HERE / "quality" / f"{part}.py"), *t, "--out", str(out / "quality")]
    script = HERE / f"step_cost_{part}.py"
    if not script.exists():
        return None
    if tiny and '"--tiny"' not in script.read_text():
        return []  # the script has no smoke-size mode: a tiny run skips it
    return [sys.executable, str(script), *t]


def run_part(part: str, argv: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=HERE.parent)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    return rc, time.perf_counter() - t0


def machine() -> str:
    import torch

    return (f"{platform.platform()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def publish(out: Path, tiny: bool) -> list[Path]:
    """Copy the final tables and figures (small files) to benchmarks/figures/ for the README."""
    dest = HERE / "figures"
    dest.mkdir(exist_ok=True)
    q = out / "quality" / ("tiny" if tiny else "")
    copied = []
    for src in [q / "finetune.png", q / "scratch.png", q / "finetune.md", q / "scratch.md", out / "summary.md",
                *sorted(out.glob("*.txt"))]:
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
            rows.append((part, "not found", 0.0, ""))
            continue
        if not argv_part:
            print(f"\n===== {part}: step_cost_{part}.py has no --tiny flag, skipped in a tiny run =====\n", flush=True)
            rows.append((part, "skipped (no --tiny)", 0.0, ""))
            continue
        print(f"\n===== {part}: {' '.join(argv_part)} =====\n", flush=True)
        rc, dt = run_part(part, argv_part, args.out / f"{part}.txt")
        rows.append((part, "ok" if rc == 0 else f"FAILED (exit {rc})", dt, " ".join(Path(a).name if i < 2 else a
                                                                                for i, a in enumerate(argv_part))))
    total = time.perf_counter() - t0
    lines = [f"# Benchmark run {started}{' (tiny)' if args.tiny else ''}", "", f"Machine: {machine()}", "",
             "| part | status | wall time | command |", "|---|---|---:|---|"]
    lines += [f"| {p} | {s} | {dt:.0f} s | `{c}` |" for p, s, dt, c in rows]
    lines += ["", f"Total wall time: {total:.0f} s ({total / 60:.1f} min)."]
    summary = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary)
    if args.publish:
        for p in publish(args.out, args.tiny):
            print(f"published {p.relative_to(HERE.parent)}")
    return 0 if all(s in ("ok", "not found", "skipped (no --tiny)") for _, s, _, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Fresh clone to the demo's first LR decisions: `make demo` now vs the old TensorFlow set-up.

    python3 bench/fresh_demo.py                 # appends a section to bench/RESULTS.md
    python3 bench/fresh_demo.py --rounds 2 --no-results

Each round clones this repository (its committed HEAD, or `--ref`) into two fresh temp dirs and,
one after the other, runs in each what a newcomer runs, with a clock from the command's start:

- lean: `make demo` (a venv without pip, the pinned `requirements/demo.txt` installed with
  --no-deps by the base interpreter's pip, Keras on JAX);
- old (the baseline, same run): what `make demo` did before, `python3 -m venv .venv`,
  `.venv/bin/python -m pip install -e '.[keras]'` (TensorFlow) and `lrpilot demo` on TensorFlow.

Figures: seconds to the first epoch row the controller answered (the first LR decision), to
the first reduction, and to the end of the 45-epoch demo; the venv's size. pip's cache is left
as found (its size is recorded), so both variants see the same one. The clone itself (local,
well under a second) is not counted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measured import context, git

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
#: An epoch row of the demo with the controller's answer: "  0  0.7073  0.6045  0.02  wait 0/10".
DECISION = re.compile(r"^\s*\d+\s+\S+\s+\S+\s+\S+\s+(wait|reduce|set)\b")
OLD = (
    "{py} -m venv .venv && .venv/bin/python -m pip install -q --no-compile -e '.[keras]' && "
    "KERAS_BACKEND=tensorflow .venv/bin/lrpilot demo"
)


@dataclass
class Run:
    variant: str
    first_decision: float | None = None
    first_reduction: float | None = None
    done: float | None = None
    rc: int | None = None
    venv_mb: float = 0.0
    backend: str = ""
    tail: str = ""


def du_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 1e6


def timed(variant: str, command: str, cwd: Path, timeout: float) -> Run:
    """Run `command` in `cwd`, noting when the demo's first decision and reduction appear."""
    run = Run(variant)
    start = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, 9))
    killer.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - start
            lines.append(line.rstrip())
            if line.startswith("keras ") and " on " in line:
                run.backend = line.split(" on ", 1)[1].strip()
            if DECISION.match(line):
                if run.first_decision is None:
                    run.first_decision = now
                if run.first_reduction is None and "reduce" in line:
                    run.first_reduction = now
        run.rc = proc.wait()
        run.done = time.monotonic() - start
    finally:
        killer.cancel()
    run.tail = "\n".join(lines[-5:])
    run.venv_mb = du_mb(cwd / ".venv")
    return run


def clone(ref: str, into: Path) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "-q", ref], check=True)


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ref", default="HEAD", help="the commit to clone (default HEAD)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    ref = git("rev-parse", args.ref)
    if not ref:
        sys.exit(f"fresh_demo: unknown ref {args.ref!r}")
    if args.ref == "HEAD" and git("status", "--porcelain", "--", "Makefile", "requirements"):
        print("fresh_demo: note: uncommitted changes to Makefile/requirements are not measured")
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    cache = Path.home() / ".cache" / "pip"
    cache_mb = du_mb(cache) if cache.exists() else 0.0
    py = shutil.which("python3") or sys.executable
    runs: list[Run] = []
    began = time.monotonic()
    for r in range(args.rounds):
        for variant in ("lean", "old"):
            with tempfile.TemporaryDirectory(prefix=f"lrpilot-fresh-{variant}-") as tmp:
                tree = Path(tmp) / "lrpilot"
                clone(ref, tree)
                command = "make demo" if variant == "lean" else OLD.format(py=py)
                run = timed(variant, command, tree, args.timeout)
            runs.append(run)
            print(
                f"round {r + 1} {variant:4}: first decision {fmt(run.first_decision)}, "
                f"first reduction {fmt(run.first_reduction)}, done {fmt(run.done)} "
                f"(rc {run.rc}), .venv {run.venv_mb:.0f} MB, backend {run.backend or '?'}",
                flush=True,
            )
            if run.rc != 0:
                print(run.tail)
    took = time.monotonic() - began

    def median(variant: str, field: str) -> float | None:
        xs = [
            v for run in runs if run.variant == variant and (v := getattr(run, field)) is not None
        ]
        return statistics.median(xs) if xs else None

    rows = []
    for field, label in [
        ("first_decision", "fresh clone to the first LR decision"),
        ("first_reduction", "to the first plateau reduction"),
        ("done", "to the end of the 45-epoch demo"),
        ("venv_mb", ".venv size (MB)"),
    ]:
        lean, old = median("lean", field), median("old", field)
        ratio = f"{lean / old:.2f}" if lean is not None and old else "—"
        unit = (lambda x: "—" if x is None else f"{x:.0f} MB") if field == "venv_mb" else fmt
        goal = "≤ 60 s" if field == "first_decision" else "—"
        if field == "first_decision" and lean is not None:
            goal += ": met" if lean <= 60 else ": NOT met"
        rows.append(f"| {label} | {unit(lean)} | {unit(old)} | {ratio} | {goal} |")
    print("\n".join(rows))
    if args.no_results:
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "",
        f"## {stamp} — fresh clone to the demo's LR decisions (bench/fresh_demo.py)",
        "",
        *[f"- {c}" for c in context(load, ["pip"], "the installs and the demo")],
        f"- cloned: commit {ref[:12]}; pip cache as found: {cache_mb:.0f} MB; python3: {py}",
        f"- run: `bench/fresh_demo.py --rounds {args.rounds}`, {took:.0f} s; per round "
        + "; ".join(
            f"{run.variant} {fmt(run.first_decision)}/{fmt(run.done)} ({run.backend or '?'})"
            for run in runs
        )
        + " (first decision/done)",
        "- lean: `make demo` (Keras on JAX, pinned requirements/demo.txt, --no-deps); old: "
        "`python3 -m venv .venv && pip install -e '.[keras]'` (TensorFlow) then `lrpilot demo`",
        "",
        "| figure | lean `make demo` | old set-up (same run) | ratio | goal (issue 19) |",
        "|---|---|---|---|---|",
        *rows,
    ]
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

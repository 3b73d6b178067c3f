"""bench/plans.py's per-step loop on CUDA: extra time per step and device syncs per step.

    .venv/bin/python bench/gpu_step.py [--quick] [--no-record]

Without a CUDA device it prints "no GPU" and exits 0. With one, the same small MLP trains on
`cuda` against a real `lrpilot serve` with a per-step exponential schedule; for each variant
(no scheduler, torch `LambdaLR`, the lrpilot plan, torch `ReduceLROnPlateau.step(loss)`, the
plan with `step(loss)` and `report_every=10`) it times the host-side cost of the scheduler
call and counts the synchronizing CUDA calls that torch reports in
`torch.cuda.set_sync_debug_mode("warn")` (each one a `UserWarning`; torch's mode does not see
every sync, see its docs, so the Tensor-subclass count of bench/plans.py is printed beside
it). The figures are appended to bench/RESULTS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plans import (
    POLICY,
    REPORT_EVERY,
    RESULTS,
    Controller,
    context,
    make_loop,
    scheduler,
)

from lrpilot.client.torch import LRPilotScheduler

KINDS = ["none", "lambda", "lrpilot-plan", "plateau-loss", "lrpilot-loss"]


def run(kind: str, endpoint: str, steps: int, round_no: int) -> tuple[float, float, int]:
    """(seconds per step, median host seconds inside the scheduler call, syncs seen by
    torch's sync debug mode in the scheduler calls) for `steps` steps on CUDA."""
    _, opt, train_step = make_loop("cuda")
    sched, call = scheduler(kind, opt, endpoint, f"gpu-{kind}-{round_no}")
    for _ in range(20):  # warm up (and say hello)
        call(train_step())
    torch.cuda.synchronize()
    inside: list[float] = []
    syncs = 0
    clock = time.perf_counter
    start = clock()
    for _ in range(steps):
        loss = train_step()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            t0 = clock()
            call(loss)
            inside.append(clock() - t0)
            torch.cuda.set_sync_debug_mode("default")
        # "called a synchronizing CUDA operation"; not the mode's own "prototype" notice
        syncs += sum("called a synchronizing" in str(w.message) for w in seen)
    torch.cuda.synchronize()
    elapsed = clock() - start
    if isinstance(sched, LRPilotScheduler):
        sched.close()
    return elapsed / steps, statistics.median(inside), syncs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing measured")
        return 0
    steps, rounds = (500, 3) if args.quick else (3000, 5)
    started, started_load = time.monotonic(), "/".join(f"{x:.2f}" for x in os.getloadavg())
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    calls: dict[str, list[float]] = {k: [] for k in KINDS}
    syncs: dict[str, int] = dict.fromkeys(KINDS, 0)
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        c = Controller(Path(tmp) / "state", policy).start()
        try:
            for r in range(rounds):
                for kind in KINDS if r % 2 == 0 else reversed(KINDS):
                    per_step, per_call, seen = run(kind, c.bind, steps, r)
                    times[kind].append(per_step)
                    calls[kind].append(per_call)
                    syncs[kind] += seen
        finally:
            c.stop()
    base = statistics.median(times["none"])
    timer = statistics.median(calls["none"])
    total = steps * rounds
    rows: list[list[str]] = [["training step on CUDA, no scheduler", f"{base * 1e6:.1f} µs", "—"]]
    for kind in KINDS[1:]:
        extra = (statistics.median(calls[kind]) - timer) * 1e6
        loop = (statistics.median(times[kind]) - base) * 1e6
        per = syncs[kind] / total
        unit = "per step"
        if kind == "lrpilot-loss":
            per, unit = syncs[kind] / (total / REPORT_EVERY), "per report"
        rows.append(
            [
                f"{kind}: extra per step (host time in the scheduler call)",
                f"{extra:+.1f} µs (whole loop {loop:+.0f} µs); {per:.2f} syncs {unit} "
                f"(torch.cuda sync debug mode, {syncs[kind]} in {total} steps)",
                "no scheduler",
            ]
        )
    for row in rows:
        print(" | ".join(row))
    if not args.no_record:
        device = torch.cuda.get_device_name()
        argv = " ".join(sys.argv[1:])
        lines = [
            *context(started_load, ["torch", "pyzmq"], "the training loop"),
            f"device: {device}; run: `bench/gpu_step.py{' ' + argv if argv else ''}`, "
            f"{steps} steps × {rounds} interleaved rounds per variant, "
            f"{time.monotonic() - started:.0f} s",
        ]
        record(rows, lines)
    return 0


def record(rows: list[list[str]], lines: list[str]) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text: list[Any] = [
        "",
        f"## {when} — per-step control on CUDA (bench/gpu_step.py)",
        "",
        *(f"- {line}" for line in lines),
        "",
        "| figure | value | baseline (same run) |",
        "|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    with RESULTS.open("a") as out:
        out.write("\n".join(text))
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())

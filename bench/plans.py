"""A per-step schedule in torch: a plan evaluated in the trainer, vs torch's own LambdaLR.

    .venv/bin/python bench/plans.py [--quick] [--no-record]

Against a real `lrpilot serve` with a per-step exponential schedule (`unit: step`), one
training loop (a small MLP, SGD, CPU) is timed in interleaved rounds, in the same run:

- no scheduler (the baseline every "extra per step" figure is taken against);
- torch's `LambdaLR` with the same schedule (`0.99 ** (step / 100)`);
- `LRPilotScheduler(unit="step")` with plans off (`plans: false` in the hello: every LR is
  a controller decision, one report per step, as before plans);
- the same with plans on (the client evaluates the plan; no message while it runs).

Also counted for the plan: the messages the client sent, and the controller's log lines
for the job (one per plan). The figures are appended to bench/RESULTS.md unless
--no-record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from conftest import Controller  # noqa: E402
from measured import context  # noqa: E402

from lrpilot.client.torch import LRPilotScheduler  # noqa: E402

POLICY = """\
version: 1
defaults:
  policy: {type: exponential, unit: step, decay_rate: 0.99, decay_steps: 100}
"""
RESULTS = ROOT / "bench" / "RESULTS.md"
LR0 = 0.1


def make_loop() -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    # A small model: the figures are the schedulers' extra time, not the step's.
    opt = torch.optim.SGD(model.parameters(), lr=LR0)
    x, y = torch.randn(64, 32), torch.randn(64, 1)

    def train_step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return model, opt, train_step


def run(kind: str, endpoint: str, steps: int, round_no: int) -> tuple[float, float, dict[str, Any]]:
    """(seconds per step of `steps` training steps with scheduler `kind`, median seconds
    inside one `scheduler.step()` call, info)."""
    _, opt, train_step = make_loop()
    info: dict[str, Any] = {}
    sched: Any = None
    if kind == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.99 ** (s / 100))
    elif kind.startswith("lrpilot"):
        sched = LRPilotScheduler(
            opt, job=f"bench-{kind}-{round_no}", endpoint=endpoint, unit="step", timeout=2.0
        )
        sched._core.plans = kind == "lrpilot-plan"  # the before/after switch
    for _ in range(20):  # warm up (and, for lrpilot, say hello)
        train_step()
        if sched is not None:
            sched.step()
    inside: list[float] = []
    clock = time.perf_counter
    start = clock()
    for _ in range(steps):
        train_step()
        if sched is not None:
            t0 = clock()
            sched.step()
            inside.append(clock() - t0)
        else:
            t0 = clock()
            inside.append(clock() - t0)  # the timer's own cost, subtracted from the others
    elapsed = clock() - start
    if isinstance(sched, LRPilotScheduler):
        client = sched.client
        info = {"sent": client.stats["sent"], "plan": client.plan is not None, "lr": client.lr}
        sched.close()
    return elapsed / steps, statistics.median(inside), info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    steps, rounds = (500, 3) if args.quick else (3000, 7)
    started, started_load = time.monotonic(), "/".join(f"{x:.2f}" for x in os.getloadavg())
    torch.set_num_threads(1)
    kinds = ["none", "lambda", "lrpilot-noplan", "lrpilot-plan"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    calls: dict[str, list[float]] = {k: [] for k in kinds}
    infos: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        c = Controller(Path(tmp) / "state", policy).start()
        try:
            for r in range(rounds):
                for kind in kinds if r % 2 == 0 else reversed(kinds):
                    per_step, per_call, info = run(kind, c.bind, steps, r)
                    times[kind].append(per_step)
                    calls[kind].append(per_call)
                    if info:
                        infos[kind] = info
            log = c.log()
        finally:
            c.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["none"]
    loop_extra = {k: (med[k] - base) * 1e6 for k in kinds}
    timer = statistics.median(calls["none"])
    extra = {k: (statistics.median(calls[k]) - timer) * 1e6 for k in kinds}
    plan_lines = sum(f"job bench-lrpilot-plan-{rounds - 1}: lr " in x for x in log.splitlines())
    noplan_lines = sum(f"job bench-lrpilot-noplan-{rounds - 1}: lr " in x for x in log.splitlines())
    lam = max(extra["lambda"], 1e-9)
    rows = [
        [
            "training step, no scheduler (median of rounds)",
            f"{base * 1e6:.1f} µs",
            "—",
            "—",
            "—",
        ],
        [
            "torch `LambdaLR`, extra per step (median time in `step()`)",
            f"{extra['lambda']:+.1f} µs (whole loop: {loop_extra['lambda']:+.0f} µs)",
            "no scheduler",
            "—",
            "—",
        ],
        [
            "`LRPilotScheduler(unit='step')`, plans off (one decision per step), extra per step",
            f"{extra['lrpilot-noplan']:+.1f} µs (whole loop: {loop_extra['lrpilot-noplan']:+.0f} "
            f"µs); {infos['lrpilot-noplan']['sent']} messages sent, {noplan_lines} controller "
            f"log lines for {steps + 20} steps",
            f"LambdaLR {extra['lambda']:+.1f} µs",
            f"{extra['lrpilot-noplan'] / lam:.1f}",
            "issue 16 'now': +206 µs (H200)",
        ],
        [
            "`LRPilotScheduler(unit='step')`, plan, extra per step",
            f"{extra['lrpilot-plan']:+.1f} µs (whole loop: {loop_extra['lrpilot-plan']:+.0f} "
            f"µs); {infos['lrpilot-plan']['sent']} messages sent, "
            f"{plan_lines} controller log line for {steps + 20} steps",
            f"LambdaLR {extra['lambda']:+.1f} µs",
            f"{extra['lrpilot-plan'] / lam:.1f}",
            "≤ 5 µs and no slower than LambdaLR: "
            + (
                "met"
                if extra["lrpilot-plan"] <= 5 and extra["lrpilot-plan"] <= extra["lambda"]
                else "not met"
            ),
        ],
    ]
    for row in rows:
        print(" | ".join(row))
    if not args.no_record:
        argv = " ".join(sys.argv[1:])
        lines = [
            *context(started_load, ["torch", "pyzmq"], "the training loop"),
            f"run: `bench/plans.py{' ' + argv if argv else ''}`, {steps} steps × {rounds} "
            f"interleaved rounds per variant, {time.monotonic() - started:.0f} s; "
            f"rounds per variant (µs/step): "
            + "; ".join(f"{k} " + ", ".join(f"{t * 1e6:.0f}" for t in times[k]) for k in kinds)
            + "; extra per step = median time inside `scheduler.step()` minus the timer's own",
        ]
        record(rows, lines)
    return 0


def record(rows: list[list[str]], lines: list[str]) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "",
        f"## {when} — a per-step schedule as a plan vs torch LambdaLR (bench/plans.py)",
        "",
        *(f"- {line}" for line in lines),
        "",
        "| figure | value | baseline (same run) | ratio to LambdaLR's extra | goal (issue 16) |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    with RESULTS.open("a") as out:
        out.write("\n".join(text))
    print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
